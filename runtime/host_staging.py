"""Host -> device input writes that do not wait for the device.

`tensor.copy_(cpu_tensor)` into CUDA memory from pageable host memory synchronises the stream: each micro-step's
first input write made the host wait until the previous micro-step had finished, and the device then idled
while the host prepared and launched the next one. `PinnedStaging` copies the value into a page-locked buffer
(a host memcpy) and queues the device copy on the current stream (`non_blocking`): stream order still puts the
copy after the program that reads the previous value, and the host runs ahead.

A staging buffer may be refilled only once the device copy that read it has run: each input name has a ring of
`depth` buffers, each with an event recorded after its copy; refilling a buffer waits on its event (with two
buffers that copy was queued a whole micro-step earlier, so the wait is normally already over).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Slot:
    buffer: torch.Tensor
    event: torch.cuda.Event = field(default_factory=torch.cuda.Event)
    used: bool = False


@dataclass
class _Ring:
    shape: tuple[int, ...]
    dtype: torch.dtype
    slots: list[_Slot]
    next: int = 0


class PinnedStaging:
    """Per input name, a ring of pinned buffers for stream-ordered host -> device copies (see module doc)."""

    def __init__(self, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self._rings: dict[str, _Ring] = {}

    def write(self, name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src: staged (`copy`) for a host src and a CUDA dst, else a plain copy_."""
        if dst.is_cuda and src.device.type == "cpu":
            self.copy(name, dst, src)
        else:
            dst.copy_(src)

    def copy(self, name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst (CUDA) <- src (host, any dtype: converted on the host into dst's dtype), queued on the current
        stream; returns without waiting for the device."""
        ring = self._rings.get(name)
        shape = tuple(src.shape)
        if ring is None or ring.shape != shape or ring.dtype != dst.dtype:
            slots = [_Slot(torch.empty(shape, dtype=dst.dtype, pin_memory=True)) for _ in range(self.depth)]
            ring = self._rings[name] = _Ring(shape, dst.dtype, slots)
        slot = ring.slots[ring.next]
        ring.next = (ring.next + 1) % self.depth
        if slot.used:
            slot.event.synchronize()  # the device copy that last read this buffer has run
        slot.buffer.copy_(src)
        dst.copy_(slot.buffer, non_blocking=True)
        slot.event.record()
        slot.used = True
