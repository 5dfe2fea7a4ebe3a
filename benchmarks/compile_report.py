"""Registers, spills and row-loop size of the Triton kernels, compiled for a GPU without one.

    python benchmarks/compile_report.py [--arch 90] [--sweep]

Ahead-of-time compiles every blur / degrade kernel (fp32, 9 taps, SD 1.5 latents at 1024 px:
4x128x128) at the tile the launchers pick on CUDA, with Triton's bundled ptxas for the given
compute capability, and prints registers per thread, spill stores/loads (STL/LDL in the SASS)
and the SASS instructions per output value in the row loop (the largest backward branch).
``--sweep`` adds the degrade forward at other strip widths and warp counts. No timing: a guide
for what to time when a GPU is lent, and a compile check the interpreter cannot give
(``tests/test_compile.py`` runs it).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default, without its warning

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sat_kernels.ops import blur, degrade  # noqa: E402
from sat_kernels.ops.utils import row_walk_tiles  # noqa: E402

FLOATS = {"threshold", "scale_h", "scale_w", "scale_log2", "inv_heads"}  # fp32 scalars; other scalars are i32


def signature(fn, **pointers: str) -> dict:
    """Triton's signature of ``fn``: the given pointer types, fp32 for the float scalars, i32 for
    the other scalars (sizes and strides); constexprs are added by compile_for."""
    params = [p.name for p in fn.params if not p.is_constexpr]
    missing = [name for name in params if name.isupper() and name not in pointers and name not in SCALARS]
    assert not missing, f"{fn.__name__}: no pointer type for {missing}"
    return {name: pointers.get(name, "fp32" if name in FLOATS else "i32") for name in params}


SCALARS = {"C", "H", "W", "MAP_H", "MAP_W", "N_TOKENS", "N_QUERIES", "HEADS", "N_PLANES"}  # upper-case sizes
FWD = signature(degrade._degrade_fwd_kernel, X0="*fp32", EPS="*fp32", SALIENCY="*fp32", ALPHAS_CUMPROD="*fp32",
                TIMESTEPS="*i64", W_WEIGHTS="*fp32", H_WEIGHTS="*fp32", OUT="*fp32", MASK="*u8")
BWD = signature(degrade._degrade_bwd_kernel, GRAD="*fp32", MASK="*u8", ALPHAS_CUMPROD="*fp32", TIMESTEPS="*i64",
                W_WEIGHTS="*fp32", H_WEIGHTS="*fp32", GRAD_X0="*fp32", GRAD_EPS="*fp32")
BLUR = signature(blur._gaussian_blur_kernel, X="*fp32", OUT="*fp32", W_WEIGHTS="*fp32", H_WEIGHTS="*fp32")
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def sass_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, STL count, LDL count, instructions in the largest loop) via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([f"{TOOLS}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([f"{TOOLS}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    code = [(int(a, 16), ins) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]+);", sass)]
    loop = 0
    for address, ins in code:
        target = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < address:  # a backward branch closes a loop
            loop = max(loop, sum(int(target.group(1), 16) <= a <= address for a, _ in code))
    ops = collections.Counter(ins.split()[0] for _, ins in code)
    return max(map(int, re.findall(r"REG:(\d+)", res))), ops["STL"], ops["LDL"], loop


def compile_for(fn, signature: dict, constexprs: dict, warps: int, arch: int) -> bytes:
    source = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=1))


def kernels(sweep: bool):
    """(label, kernel, signature, constexprs, num_warps, output values per thread) to compile."""
    fp32 = triton.language.float32
    ch, bw, cp, warps = row_walk_tiles(128, 128, 4, "cuda")
    tile = dict(KERNEL_SIZE=9, BLOCK_ROWS=ch, BLOCK_W=bw, COMPUTE_DTYPE=fp32)
    per_thread = cp * bw // (32 * warps)
    mass = dict(BLOCK_C=cp, BLOCK_TOKENS=64, BLOCK_Q=1, IS_PROBS=False, MEAN_THRESHOLD=False, WRITE_MASK=True)
    probs = dict(BLOCK_C=cp, BLOCK_TOKENS=64, BLOCK_Q=64, IS_PROBS=True, MEAN_THRESHOLD=False, WRITE_MASK=True)
    yield "degrade fwd, from mass", degrade._degrade_fwd_kernel, FWD, {**tile, **mass}, warps, per_thread
    yield "degrade fwd, from probs", degrade._degrade_fwd_kernel, FWD, {**tile, **probs}, warps, per_thread
    yield "degrade bwd", degrade._degrade_bwd_kernel, BWD, {**tile, "BLOCK_C": cp, "NEED_X0": True, "NEED_EPS": True}, warps, per_thread
    yield "blur fwd", blur._gaussian_blur_kernel, BLUR, {**tile, "BLOCK_PLANES": cp, "ADJOINT": False}, warps, per_thread
    yield "blur adjoint", blur._gaussian_blur_kernel, BLUR, {**tile, "BLOCK_PLANES": cp, "ADJOINT": True}, warps, per_thread
    if sweep:
        for block_w in (32, 64, 128):
            for w in (1, 2, 4, 8):
                yield (f"degrade fwd, from mass, BW={block_w} warps={w}", degrade._degrade_fwd_kernel, FWD,
                       {**tile, "BLOCK_W": block_w, **mass}, w, max(1, cp * block_w // (32 * w)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--sweep", action="store_true", help="also other strip widths / warp counts")
    args = parser.parse_args()
    ch, bw, cp, warps = row_walk_tiles(128, 128, 4, "cuda")
    print(f"sm_{args.arch}, Triton {triton.__version__}; launcher tile on CUDA: CH={ch} rows, BW={bw}, CP={cp}, "
          f"{warps} warps")
    for label, fn, signature, constexprs, w, per_thread in kernels(args.sweep):
        regs, stl, ldl, loop = sass_usage(compile_for(fn, signature, constexprs, w, args.arch).asm["cubin"])
        print(f"{label:42s} registers={regs:3d} spill stores={stl:4d} loads={ldl:4d} "
              f"row loop={loop:4d} instructions ({loop / per_thread:5.1f} per value)")


if __name__ == "__main__":
    main()
