"""Numba's on-disk kernel cache can key every kernel variant, stably across processes; run as a script.

`jit_kernel` compiles with `cache=True` on a GPU. Numba keys a cached kernel by its bytecode and a pickle of
its closure (our kernels are closures over dtypes, block sizes and device functions); a closure that cannot
be pickled makes the launch raise, and one whose pickle differs between processes never hits the cache.
This builds every registry kernel variant (launch replaced, no GPU or toolkit needed), and prints one
`<kernel> <sha256 of the closure pickle> <cache path>` line each, then `CACHE-KEYS <count>`.
"""

from __future__ import annotations

import hashlib
import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"


def main() -> int:
    from numba.cuda.serialize import dumps

    from .cases import kernel_name, launch_every_case

    seen: dict = {}

    def fake_launch(kernel, grid, block, *args):
        if id(kernel) in seen:
            return
        cache = kernel._cache
        if type(cache).__name__ != "CUDACache":
            raise SystemExit(f"{kernel.py_func.__qualname__}: not cached ({type(cache).__name__})")
        cvars = tuple(c.cell_contents for c in kernel.py_func.__closure__ or ())
        digest = hashlib.sha256(dumps(cvars)).hexdigest()[:16]
        seen[id(kernel)] = (kernel_name(kernel), digest, cache.cache_path)

    launch_every_case(fake_launch)
    for name, digest, path in sorted(seen.values()):
        print(name, digest, path)
    print(f"CACHE-KEYS {len(seen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
