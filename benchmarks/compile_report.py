"""Registers and spills of the fused degrade kernel per tile shape, compiled for a GPU without one.

    python benchmarks/compile_report.py [--arch 90]

Ahead-of-time compiles ``_degrade_fwd_kernel`` (fp32, from a mass, 9 taps) with Triton's bundled
ptxas for the given compute capability and prints registers per thread and spill stores/loads
(STL/LDL in the SASS) for each (ROWS, BW, num_warps). No timing: a guide for what to time first
when a GPU is lent (a kernel at 255 registers fits two 128-thread programs per SM).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default, without its warning

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sat_kernels.ops import degrade  # noqa: E402

SIGNATURE = dict(
    X0="*fp32", EPS="*fp32", SAL="*fp32", AC="*fp32", TS="*i64", TAPS="*fp32", OUT="*fp32", MASK="*u8",
    C="i32", H="i32", W="i32", MH="i32", MW="i32", N="i32", NQ="i32", HEADS="i32",
    sx_b="i32", sx_c="i32", sx_h="i32", sx_w="i32", se_b="i32", se_c="i32", se_h="i32", se_w="i32",
    ss_b="i32", ss_h="i32", ss_q="i32", ss_k="i32", s_ac="i32", thr="fp32", scale_h="fp32", scale_w="fp32",
    **dict.fromkeys(["KS", "ROWS", "HALO", "BW", "BORDER", "CPP", "TOKS", "BQ", "IS_PROBS", "MEAN_THR",
                     "WRITE_MASK", "CDT"], "constexpr"),
)


def usage(cubin: bytes) -> tuple[str, int, int]:
    """(registers, STL count, LDL count) from cuobjdump, which ships with Triton's NVIDIA backend."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([f"{tools}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([f"{tools}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = ",".join(re.findall(r"REG:(\d+)", res))
    return regs, len(re.findall(r"\bSTL", sass)), len(re.findall(r"\bLDL", sass))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    fp32 = triton.language.float32
    for rows in (16, 32):
        for block_w in (32, 64, 128):
            for warps in (4, 8):
                consts = dict(KS=9, ROWS=rows, HALO=triton.next_power_of_2(rows + 8), BW=block_w, BORDER=16,
                              CPP=4, TOKS=1024, BQ=1, IS_PROBS=False, MEAN_THR=False, WRITE_MASK=False, CDT=fp32)
                kernel = triton.compile(ASTSource(fn=degrade._degrade_fwd_kernel, signature=SIGNATURE,
                                                  constexprs=consts),
                                        target=target, options=dict(num_warps=warps, num_stages=1))
                regs, stl, ldl = usage(kernel.asm["cubin"])
                print(f"degrade fwd ROWS={rows:2d} BW={block_w:3d} warps={warps}: registers={regs:>4s} "
                      f"spill stores={stl:4d} loads={ldl:4d} shared={kernel.metadata.shared} B")


if __name__ == "__main__":
    main()
