"""This process's place in the data-parallel world, and the collectives the training loop uses.

Every helper is a no-op (or the identity) when no process group is initialised, so single-rank code
paths call them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# A collective that waits longer than this means a peer died or hangs: fail instead of waiting forever.
DEFAULT_TIMEOUT_S = 600.0
MAX_TIMEOUT_S = 1e9  # ~31 years: "never"; beyond ~1e14 s a timedelta overflows


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if initialized() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if initialized() else 1


def env_int(name: str, default: int, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    """The integer in environment variable `name` (`default` when unset or empty); a `UserError` naming the
    variable and its value otherwise (WORLD_SIZE=abc was a ValueError traceback)."""
    from surogate.errors import UserError

    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not minimum <= value <= maximum:
        raise UserError(f"environment variable {name}={os.environ[name]!r}: expected an integer from {minimum} to "
                        f"{maximum}")
    return value


def env_rank() -> int:
    """This process's RANK from the environment (0 when unset), checked against WORLD_SIZE."""
    from surogate.errors import UserError

    rank_, world_ = env_int("RANK", 0), env_int("WORLD_SIZE", 1, minimum=1)
    if rank_ >= world_:
        raise UserError(f"environment variables RANK={rank_} and WORLD_SIZE={world_}: RANK must be below WORLD_SIZE")
    return rank_


def env_timeout_s() -> float:
    """SUROGATE_DIST_TIMEOUT (seconds a collective may wait; DEFAULT_TIMEOUT_S when unset): a positive number."""
    from surogate.errors import UserError

    text = os.environ.get("SUROGATE_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_TIMEOUT_S:  # also NaN
        raise UserError(f"environment variable SUROGATE_DIST_TIMEOUT={os.environ['SUROGATE_DIST_TIMEOUT']!r}: "
                        f"expected a positive number of seconds, at most {MAX_TIMEOUT_S:.0e}")
    return value


def local_rank() -> int:
    return env_int("LOCAL_RANK", 0) if initialized() else 0


def node_rank() -> int:
    """Which node this rank runs on (picks the node-local data folder)."""
    return env_int("GROUP_RANK", env_int("SUROGATE_NODE_RANK", 0)) if initialized() else 0


def init_from_env(backend: str, timeout_s: float | None = None) -> None:
    """Join the world described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (our launcher or torchrun).

    `backend` is the executor backend: `cuda` -> NCCL with device LOCAL_RANK, `cpu` -> gloo.
    """
    import torch.distributed as dist

    if initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s or env_timeout_s())
    env_rank()  # RANK and WORLD_SIZE are numbers, RANK below WORLD_SIZE (torch's own errors are tracebacks)
    env_int("MASTER_PORT", 0, minimum=1, maximum=65535)
    if backend == "cuda":
        local, have = env_int("LOCAL_RANK", 0), torch.cuda.device_count()
        if local >= have:
            from surogate.errors import NotAvailableError

            raise NotAvailableError(f"local rank {local} needs GPU {local} but {have} GPU(s) are visible on this node; "
                                    "start at most one rank per visible GPU")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def _device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum (or `min` / `max`) of a few floats over all ranks (fp64)."""
    if not initialized():
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return [float(v) for v in t.cpu()]


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled)."""
    if not initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (pickled), in rank order, on rank 0; None elsewhere."""
    if not initialized():
        return [obj]
    import torch.distributed as dist

    out = [None] * world() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if initialized():
        import torch.distributed as dist

        dist.barrier()


def node_first(fn: Callable[[], T]) -> T:
    """`fn()` on every rank, local rank 0 of each node before the others (it fills a node-local cache they
    then read). A collective: every rank calls it."""
    if not initialized():
        return fn()
    if local_rank() != 0:
        barrier()
    out = fn()
    if local_rank() == 0:
        barrier()
    return out


def all_gather_rows(shard: torch.Tensor, full_rows: int) -> torch.Tensor:
    """Concatenate every rank's equally shaped `shard` along dim 0 and cut to `full_rows` rows."""
    if not initialized():
        return shard[:full_rows]
    import torch.distributed as dist

    shard = shard.contiguous()
    parts = [torch.empty_like(shard) for _ in range(world())]
    dist.all_gather(parts, shard)
    return torch.cat(parts, 0)[:full_rows]


def shutdown() -> None:
    if initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
