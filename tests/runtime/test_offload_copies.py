"""The ordering rules of offload copies on a side stream (runtime/offload_copies.py), on a hand-made tensor table
whose byte ranges make each hazard explicit. The deferred emulation runs a copy only when compute waits for it,
so "ran" below means "compute waited for it"."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from surogate.compiler.ir import Op, Role, Space, Tensor
from surogate.runtime.offload_copies import DeferredStreams, InlineStreams, OffloadCopies


def _tensor(name, space, offset, nbytes, **attrs):
    return Tensor(name, (nbytes // 4,), "fp32", Role.ACTIVATION, space, offset=offset, attrs=attrs)


@pytest.fixture
def copies():
    tensors = {t.name: t for t in [
        _tensor("act", Space.DEVICE, 0, 64),          # stored to the host by a copy
        _tensor("reuse", Space.DEVICE, 32, 64),       # a later tensor in part of act's memory
        _tensor("other", Space.DEVICE, 256, 64),      # memory no copy touches
        _tensor("act@host", Space.HOST, 0, 64),
        _tensor("stage", Space.DEVICE, 512, 64),      # a load's destination
        _tensor("stage_col", Space.DEVICE, 512, 16, view={"of": "stage", "col": 0}),
        _tensor("w@host", Space.HOST, 128, 64),
    ]}
    ran: list[str] = []
    streams = DeferredStreams()
    engine = OffloadCopies(SimpleNamespace(tensors=tensors), streams)
    engine.begin()

    def issue(kind, src, dst):
        engine.issue(Op(f"{kind}:{src}", kind, [src], [dst], phase="copy"), lambda: ran.append(src))

    return SimpleNamespace(engine=engine, streams=streams, ran=ran, issue=issue)


def _op(inputs, outputs):
    return Op("compute", "matmul", list(inputs), list(outputs))


def test_a_reader_of_a_loads_destination_waits_for_it(copies):
    copies.issue("copy_h2d", "w@host", "stage")
    copies.engine.before(_op(["other"], ["other"]))
    assert copies.ran == []  # unrelated compute overlaps the load
    copies.engine.before(_op(["stage_col"], ["other"]))  # a column view of the destination: its memory
    assert copies.ran == ["w@host"] and copies.engine.pending == []


def test_a_writer_over_a_stores_source_memory_waits_for_it(copies):
    copies.issue("copy_d2h", "act", "act@host")
    copies.engine.before(_op(["act"], ["other"]))  # reading the source alongside the copy is fine
    assert copies.ran == []
    copies.engine.before(_op(["other"], ["reuse"]))  # the arena reuses act's bytes: the store must be done
    assert copies.ran == ["act"]


def test_waiting_for_a_copy_retires_the_ones_issued_before_it(copies):
    copies.issue("copy_d2h", "act", "act@host")
    copies.issue("copy_h2d", "w@host", "stage")
    copies.engine.before(_op(["stage"], ["other"]))  # needs the second copy: the stream ran the first before it
    assert copies.ran == ["act", "w@host"] and copies.engine.pending == []


def test_a_reader_of_host_memory_a_store_is_writing_waits(copies):
    copies.issue("copy_d2h", "act", "act@host")
    copies.engine.before(_op(["act@host"], ["other"]))  # a zero-copy op reading the host copy
    assert copies.ran == ["act"]


def test_the_end_of_a_program_joins_every_copy(copies):
    copies.issue("copy_d2h", "act", "act@host")
    copies.issue("copy_h2d", "w@host", "stage")
    copies.engine.join()
    assert copies.ran == ["act", "w@host"] and copies.engine.pending == [] and copies.streams.queue == []


def test_inline_copies_run_when_issued_and_leave_nothing_pending():
    ran = []
    engine = OffloadCopies(SimpleNamespace(tensors={}), InlineStreams())
    engine.issue(Op("c", "copy_h2d", ["x"], ["y"], phase="copy"), lambda: ran.append(1))
    assert ran == [1] and engine.pending == []
