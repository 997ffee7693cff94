"""Capture and restore the random-number generators (Python, NumPy, torch CPU and CUDA) for resumable runs.

States are split into JSON-able parts (Python's and NumPy's Mersenne-Twister words) and tensors
(torch's generator states are uint8 tensors), so a checkpoint needs neither pickle nor a custom format.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from surogate.errors import UserError

TENSOR_PREFIX = "__rng__."


@dataclass
class RngState:
    """Every generator's state at one moment."""

    python: Any
    numpy: dict[str, Any]
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] = field(default_factory=list)

    def to_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able dict, tensors named `__rng__.*`) for a checkpoint."""
        version, words, gauss = self.python
        meta = {"python": {"version": version, "words": list(words), "gauss": gauss}, "numpy": self.numpy,
                "cuda_devices": len(self.torch_cuda)}
        tensors = {f"{TENSOR_PREFIX}torch_cpu": self.torch_cpu}
        tensors |= {f"{TENSOR_PREFIX}torch_cuda_{i}": t for i, t in enumerate(self.torch_cuda)}
        return meta, tensors

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> RngState:
        try:
            py = meta["python"]
            python = (py["version"], tuple(py["words"]), py["gauss"])
            cuda = [tensors[f"{TENSOR_PREFIX}torch_cuda_{i}"] for i in range(int(meta["cuda_devices"]))]
            return cls(python, meta["numpy"], tensors[f"{TENSOR_PREFIX}torch_cpu"], cuda)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: random-generator state is incomplete or malformed ({exc!r})") from exc


def capture() -> RngState:
    """Snapshot the Python, NumPy, torch-CPU and (if present) every CUDA device's generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    np_state = {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached)}
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return RngState(random.getstate(), np_state, torch.get_rng_state().clone(), cuda)


def restore(state: RngState) -> None:
    """Put every generator back where `capture()` found it."""
    random.setstate(state.python)
    n = state.numpy
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state.torch_cpu.to(torch.uint8).cpu())
    if state.torch_cuda and torch.cuda.is_available():
        # A resume on a different device count restores the devices both runs have; exact replay
        # of random draws is then impossible anyway (the data-parallel split differs).
        for i in range(min(len(state.torch_cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(state.torch_cuda[i].to(torch.uint8).cpu(), device=i)
