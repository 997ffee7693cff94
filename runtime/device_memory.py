"""A device that cannot hold what the plan says a run needs: said in words, not as torch's OutOfMemoryError
traceback. At allocation (the arenas, the weights) the plan does not fit this device as it is now: exit 2, with
what is free and what lowers the plan. During a step (another process took memory, the plan's estimate of a
library's workspace was short): the run fails (exit 1) after the step's starting state was saved, and the same
command resumes with a lower plan (recompute, offloading and chunking may change on resume)."""

from __future__ import annotations

from typing import Any

import torch

from surogate.errors import RunFailedError, UserError

LOWER_THE_PLAN = ("`surogate plan CONFIG` shows the memory by category and what makes it fit (recompute, offload_*, "
                  "lmhead_chunks, a smaller per_device_train_batch_size)")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def _free_now(device: str | torch.device) -> str:
    """`, X of Y GiB free now` on a CUDA device, else ''."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return ""
    try:
        free, total = torch.cuda.mem_get_info(dev)
    except RuntimeError:
        return ""
    return f"; {free / 2**30:.2f} of {total / 2**30:.2f} GiB are free on {dev} now"


def _cause(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def allocation_error(need_bytes: int, device: str | torch.device, exc: BaseException) -> UserError:
    """The plan's arenas or weights do not fit `device` as it is now (other processes hold memory, or the card is
    smaller than the plan was checked against)."""
    return UserError(f"device memory: the plan needs {need_bytes / 2**30:.2f} GiB and the device could not give it "
                     f"({_cause(exc)}){_free_now(device)}: another process may hold memory (nvidia-smi shows which), "
                     f"or lower the plan: {LOWER_THE_PLAN}")


def step_error(step: int, device: str | torch.device, exc: BaseException, saved: Any) -> RunFailedError:
    """A step ran out of device memory; `saved`: the checkpoint the same command resumes from (None: none)."""
    then = (f"{saved} holds the state before it: lower the plan and run the same command again to resume from it"
            if saved is not None else "no checkpoint holds this run's state")
    return RunFailedError(f"device memory: step {step} ran out of memory ({_cause(exc)}){_free_now(device)}; {then} "
                          f"(recompute, offloading and chunking may change on resume). {LOWER_THE_PLAN}")
