import onnx
import pytest

from surogate.compiler import planfile
from surogate.compiler.planfile import read_plan, write_plan
from surogate.errors import UserError

from .helpers import back_half


@pytest.fixture(scope="module")
def plan():
    return back_half(dict(recompute=True, lmhead_chunks=2), gpus=2, zero_level=3, offload_residual=True,
                     offload_optimizer=True, max_grad_norm=1.0, master_dtype="fp32")


def test_round_trip_is_identical(plan, tmp_path):
    path = write_plan(plan, tmp_path / "plan.bin")
    back = read_plan(path)
    assert back == plan  # every field: ops (attrs, phases, layers), tensor table, lifetimes, memory, config
    assert back.ops == plan.ops and back.tensors == plan.tensors and back.memory == plan.memory
    assert [p.name for p in tmp_path.iterdir()] == ["plan.bin"]  # no temp file left behind


def test_file_is_an_onnx_model_with_custom_domain(plan, tmp_path):
    path = write_plan(plan, tmp_path / "plan.bin")
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} == {"ai.surogate"}
    assert len(model.graph.node) == len(plan.ops)
    assert not model.graph.initializer  # weights referenced, never embedded
    typed = {vi.name for vi in model.graph.value_info} | {vi.name for vi in model.graph.input}
    assert typed == set(plan.tensors)
    onnx.checker.check_model(model)  # single-assignment names, topologically sorted, valid custom-domain nodes
    # Weights and states are graph inputs (read before written); in-place writes get versioned names.
    assert {"L0.w1", "L0.w1@m"} <= {vi.name for vi in model.graph.input}
    assert any("#v" in o for n in model.graph.node for o in n.output)
    sources = {t.source for t in read_plan(path).tensors.values() if t.source}
    assert "L0.w1" in sources


def test_version_mismatch_is_rejected(plan, tmp_path, monkeypatch):
    path = tmp_path / "plan.bin"
    monkeypatch.setattr(plan, "version", 999)
    write_plan(plan, path)
    with pytest.raises(UserError, match="format version 999.*re-run `surogate plan`"):
        read_plan(path)


@pytest.mark.parametrize("mangle", [
    lambda data: b"definitely not a plan" * 10,
    lambda data: data[: len(data) // 2],
    lambda data: data[:-200] + bytes(b ^ 0x55 for b in data[-200:]),
])
def test_corrupt_file_is_rejected(plan, tmp_path, mangle):
    path = tmp_path / "plan.bin"
    write_plan(plan, path)
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(UserError, match="plan.bin"):
        read_plan(path)


@pytest.mark.parametrize("where", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_one_flipped_byte_is_rejected(plan, tmp_path, where):
    path = tmp_path / "plan.bin"
    write_plan(plan, path)
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF  # inside the payload it can leave invalid UTF-8 (protobuf gives bytes)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="plan.bin"):
        read_plan(path)


def test_other_onnx_model_is_not_a_plan(tmp_path):
    path = tmp_path / "model.onnx"
    graph = onnx.helper.make_graph([], "g", [], [])
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(UserError, match="not a Surogate plan file"):
        read_plan(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read plan file"):
        read_plan(tmp_path / "nope.bin")


def test_failed_write_leaves_previous_file(plan, tmp_path, monkeypatch):
    path = tmp_path / "plan.bin"
    write_plan(plan, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(planfile.os, "replace", boom)
    with pytest.raises(UserError, match="cannot write plan file .*disk full"):
        write_plan(plan, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.bin"]


def test_unwritable_destination_is_a_user_error(plan, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write plan file"):
        write_plan(plan, blocker / "plan.bin")  # parent is a file
