"""When the reader of stdout goes away (`surogate sft cfg.yaml | head`, a `tee` that died, a terminal that hung
up), writes raise BrokenPipeError (Python ignores SIGPIPE) or EIO. A training run must not die of it: the console
stops printing, stdout is pointed at /dev/null, and training, checkpoints, the log file and exports go on. Other
commands stop quietly (exit `EXIT_CODE`, as a shell reports a process ended by SIGPIPE) instead of a traceback."""

from __future__ import annotations

import errno
import os
import sys

EXIT_CODE = 141  # 128 + SIGPIPE


def is_closed_pipe(exc: BaseException) -> bool:
    """Whether `exc` says the reader of the stream closed it."""
    return isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)


def is_gone_console(exc: BaseException) -> bool:
    """Whether a write to the console failed because nobody reads it any more: a closed pipe, or a terminal that
    hung up (EIO after SIGHUP). Only for console writes: elsewhere EIO is a real I/O error."""
    return is_closed_pipe(exc) or (isinstance(exc, OSError) and exc.errno == errno.EIO)


def detach_stdout() -> None:
    """Point the process's stdout (file descriptor 1, or wherever sys.stdout writes) at /dev/null: later writes,
    and the interpreter's flush at exit, go nowhere instead of raising again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
