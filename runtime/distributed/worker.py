"""One rank of a local launch: `python -m surogate.runtime.distributed.worker WORKDIR`.

Reads the pickled (cfg, plan, backend) from WORKDIR/payload.pkl, joins the process group described by
the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), trains, and leaves either
WORKDIR/result.pkl (rank 0) or WORKDIR/error-{rank}.json (the error the launcher reports).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import traceback
from pathlib import Path

from surogate.errors import UserError

LAUNCHER_PID_ENV = "SUROGATE_LAUNCHER_PID"  # set by launch.launch_local


def die_with_launcher() -> None:
    """Get SIGTERM when the launcher dies (even by SIGKILL), so no rank outlives it (Linux). Set here, in the
    worker, not in a Popen preexec_fn: code between fork and exec in a threaded launcher can deadlock."""
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0"))
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # the launcher died before the request above took effect
        os._exit(1)


def accept_stop_signals() -> None:
    """Unblock SIGTERM and SIGINT in this rank. Ray starts its processes with SIGINT blocked, and a signal mask
    survives fork and exec: a rank started by a Ray node agent (ray_launch) would otherwise keep a SIGINT passed
    on to it pending for ever instead of stopping with a checkpoint."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def stop_signals_raise() -> None:
    """Until run_training installs its own handlers (in its setup a stop signal raises `Interrupted` too), a
    SIGTERM raises `Interrupted` rather than killing the rank: the launcher then hears "interrupted by SIGTERM"
    and exit code 143, not "killed by signal SIGTERM" (a crash, exit 1). SIGINT raises KeyboardInterrupt
    already (once unblocked), which reports the same way."""
    from surogate.runtime.stop_signals import Interrupted

    def _raise(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, _raise)


def main(argv: list[str]) -> int:
    accept_stop_signals()  # first, in the main thread: threads started later inherit its mask
    stop_signals_raise()
    die_with_launcher()
    work = Path(argv[0])
    rank = int(os.environ["RANK"])
    try:
        with open(work / "payload.pkl", "rb") as f:
            payload = pickle.load(f)
        from surogate.runtime.distributed import comm
        from surogate.runtime.session import run_training

        comm.init_from_env(payload["backend"])
        result = run_training(payload["cfg"], plan=payload["plan"], backend=payload["backend"])
        # the run is over (its handlers are gone): a late stop signal (a repeat the launcher passes on) must not
        # kill the rank while it hands its result over; a rank stuck here still gets the launcher's SIGKILL
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        if rank == 0:
            tmp = work / f".result.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                pickle.dump(result, f)
            os.replace(tmp, work / "result.pkl")
        comm.barrier()  # nobody leaves while another rank may still need it
        comm.shutdown()
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the launcher
        message, code = failure_report(exc)
        if code == 1:
            traceback.print_exc()
        _report(work, rank, message, code)
        return code


def failure_report(exc: BaseException) -> tuple[str, int]:
    """What a rank tells its launcher about `exc`: (message, exit code). A user error keeps its code; a stop
    signal outside the training loop (setup, exports: stop_signals.Interrupted) is not a crash, it exits
    128 + the signal's number as a one-process run would; anything else is a crash (1)."""
    if isinstance(exc, UserError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        import signal

        from surogate.runtime.stop_signals import exit_code, signal_of

        signum = signal_of(exc)
        return (f"interrupted by {signal.Signals(signum).name} (the last saved checkpoint is kept; the same "
                "command resumes from it)"), exit_code(signum)
    return f"{type(exc).__name__}: {exc}", 1


def _report(work: Path, rank: int, message: str, exit_code: int) -> None:
    tmp = work / f".error-{rank}.tmp"
    tmp.write_text(json.dumps({"message": message, "exit_code": exit_code}), encoding="utf-8")
    os.replace(tmp, work / f"error-{rank}.json")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
