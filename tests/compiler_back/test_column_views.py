"""Column views in the IR (`attrs["view"]`): nested views own no memory (their root does), writing a parent writes
every view inside it, and an accumulating write into a view of an already written parent adds."""

from __future__ import annotations

import pytest

from surogate.compiler.ir import (
    Graph,
    GraphError,
    Op,
    Role,
    Tensor,
    first_writers,
    view_descendants,
    view_owners,
    view_root,
)


def _graph() -> Graph:
    """D = [dx | dh_G], dh_G = [dh_1 | dh_2] (as fold_lora_up_projection's backward builds them)."""
    g = Graph()
    for t in (Tensor("dy", (4, 6), "fp32", Role.INPUT), Tensor("W", (6, 12), "fp32", Role.FROZEN_WEIGHT),
              Tensor("A", (4, 8), "fp32", Role.FROZEN_WEIGHT), Tensor("D", (4, 12), "fp32", Role.ACTIVATION_GRAD),
              Tensor("dx", (4, 8), "fp32", Role.ACTIVATION_GRAD, attrs={"view": {"of": "D", "col": 0}}),
              Tensor("dh", (4, 4), "fp32", Role.ACTIVATION_GRAD, attrs={"view": {"of": "D", "col": 8}}),
              Tensor("dh1", (4, 2), "fp32", Role.ACTIVATION_GRAD, attrs={"view": {"of": "dh", "col": 0}}),
              Tensor("dh2", (4, 2), "fp32", Role.ACTIVATION_GRAD, attrs={"view": {"of": "dh", "col": 2}})):
        g.add_tensor(t)
    g.add_op(Op("data", "linear_bwd_data", ["dy", "W"], ["D"], {}))
    g.add_op(Op("a_data", "linear_bwd_data", ["dh", "A"], ["dx"], {"accumulate_into": ["dx"]}))
    return g


def test_nested_views_belong_to_their_root():
    g = _graph()
    assert view_root(g.tensors, "dh2") == "D" and view_owners(g.tensors)["dh1"] == "D"
    assert sorted(view_descendants(g.tensors)["D"]) == ["dh", "dh1", "dh2", "dx"]


def test_writing_a_parent_writes_its_nested_views_and_the_columns_write_the_parent():
    g = _graph()
    g.check()  # a_data reads dh, written by `data` through D
    g.add_tensor(Tensor("out", (4, 2), "fp32", Role.ACTIVATION))
    g.add_op(Op("h1", "identity", ["dh1"], ["out"], {}))  # dh1, two levels inside D, written by `data`
    g.check()
    bad = _graph()
    bad.add_tensor(Tensor("E", (4, 4), "fp32", Role.ACTIVATION))
    bad.add_tensor(Tensor("e1", (4, 2), "fp32", Role.ACTIVATION, attrs={"view": {"of": "E", "col": 0}}))
    bad.add_tensor(Tensor("e2", (4, 2), "fp32", Role.ACTIVATION, attrs={"view": {"of": "E", "col": 2}}))
    bad.add_op(Op("w1", "identity", ["dy"], ["e1"], {}))
    bad.add_tensor(Tensor("out", (4, 4), "fp32", Role.ACTIVATION))
    bad.add_op(Op("read", "identity", ["E"], ["out"], {}))
    with pytest.raises(GraphError, match="reads 'E' before"):  # one column of two written: E is not
        bad.check()
    bad.add_op(Op("w2", "identity", ["dy"], ["e2"], {}), after="w1")
    bad.check()


def test_an_accumulating_write_into_a_view_of_a_written_parent_adds():
    g = _graph()
    first = first_writers(g.ops(), g.tensors)
    assert first["D"] == first["dx"] == first["dh1"] == 0  # `a_data` is not dx's first writer: it adds
    from surogate.runtime.backends.cuda_sizes import accumulates

    ops = list(g.ops())
    assert accumulates(ops[1], 1, first, g.tensors) == [True]
    assert accumulates(ops[0], 0, first, g.tensors) == [False]
