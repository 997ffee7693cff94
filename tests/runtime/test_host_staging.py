"""PinnedStaging (runtime/host_staging.py): host -> device input writes queued on the stream, no device sync."""

from __future__ import annotations

import pytest
import torch

from surogate.runtime.host_staging import PinnedStaging


def test_a_host_destination_is_a_plain_copy_with_dtype_conversion():
    staging = PinnedStaging()
    dst = torch.zeros(3, 4, dtype=torch.int64)
    staging.write("ids", dst, torch.arange(12, dtype=torch.int32).view(3, 4))
    assert dst.dtype == torch.int64 and dst.flatten().tolist() == list(range(12))
    assert staging._rings == {}  # nothing staged: no CUDA destination


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        PinnedStaging(depth=0)


@pytest.mark.gpu
def test_queued_writes_do_not_wait_for_the_device_and_each_reader_sees_its_value():
    staging = PinnedStaging(depth=2)
    dst = torch.zeros(4, 1000, dtype=torch.int64, device="cuda")
    seen = []
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # keep the stream busy (~0.1 s): a syncing copy would wait for it
    for i in range(5):  # more writes than buffers: the ring refills only buffers whose copy has run
        staging.write("ids", dst, torch.full((4, 1000), i, dtype=torch.int32))  # converted to int64 on the host
        if i == 0:
            assert not torch.cuda.current_stream().query(), "the host waited for the device"
        seen.append(dst.sum())  # a reader queued after each write, before the next
    torch.cuda.synchronize()
    assert [int(s) for s in seen] == [4000 * i for i in range(5)]


@pytest.mark.gpu
def test_a_new_shape_gets_new_buffers():
    staging = PinnedStaging()
    small, large = torch.empty(3, device="cuda"), torch.empty(7, device="cuda")
    staging.write("x", small, torch.ones(3))
    staging.write("x", large, torch.linspace(0, 1, 7))
    assert staging._rings["x"].shape == (7,)
    torch.cuda.synchronize()
    assert torch.equal(small.cpu(), torch.ones(3)) and torch.equal(large.cpu(), torch.linspace(0, 1, 7))
