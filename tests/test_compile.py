"""The Triton kernels compile for an H100 (sm_90) without spilling registers, checked without a GPU.

The interpreter runs every kernel's math on CPU but never lowers it, so constructs the GPU
compiler rejects (layouts of ``tl.gather``, tuples carried through loops) would otherwise first
fail on a lent GPU. ``benchmarks/compile_report.py`` compiles each kernel at the tile the launchers
pick on CUDA with Triton's bundled ptxas; it needs no GPU, only a fresh process without
TRITON_INTERPRET.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import triton

ROOT = pathlib.Path(__file__).resolve().parents[1]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
KERNELS = ["degrade fwd, from mass", "degrade fwd, from probs", "degrade bwd", "blur fwd", "blur adjoint"]


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no NVIDIA ptxas")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--arch", "90"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line[:42].strip(): line for line in run.stdout.splitlines()}
    for name in KERNELS:
        assert name in rows, f"{name} missing from:\n{run.stdout}"
        spills = re.search(r"spill stores=\s*(\d+) loads=\s*(\d+)", rows[name])
        assert spills.groups() == ("0", "0"), f"{name} spills registers at the launcher's tile: {rows[name]}"
