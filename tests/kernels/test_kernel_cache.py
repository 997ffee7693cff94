"""Numba's on-disk cache (`cache=True`, see `_device.jit_kernel`) can store every kernel variant, under keys
that are the same in every process (else each GPU process recompiles everything: ~1-2 s per variant)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _keys(tmp_path: Path, seed: str) -> list[str]:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-m", "tests.kernels.cache_check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    return out.stdout.strip().splitlines()


def test_every_kernel_variant_has_a_cache_key_stable_across_processes(tmp_path):
    first, second = _keys(tmp_path, "1"), _keys(tmp_path, "2")
    assert first[-1].startswith("CACHE-KEYS") and int(first[-1].split()[1]) >= 40, first[-3:]
    assert first == second  # same closure pickles (hash seeds differ): a second process hits the cache
    assert all(str(tmp_path) in line for line in first[:-1])  # NUMBA_CACHE_DIR is where the cache goes
