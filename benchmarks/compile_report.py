"""Registers, spills, shared memory and row-loop size of every Triton kernel variant, compiled for a
GPU without one.

    python benchmarks/compile_report.py [--arch 90] [--jobs N] [--json] [--sweep]

Ahead-of-time compiles each kernel of ``sat_kernels.ops`` with Triton's bundled ptxas for the given
compute capability, once per variant the launchers can pick on CUDA: every constexpr branch (blur
or adjoint; degrade from a mass, from probabilities or from the backward's saved mask, constant or
"mean" threshold, with or without the saved mask; which gradients; fp32 "tf32x3" or half
tensor-core dots) crossed with fp32 / fp16 / bf16 inputs, plus the fp64 compute branch
(gradcheck's, and the attention statistics' float64 outputs and "ieee" dots) once per kernel, at
the tiles the launchers pick on CUDA (SD 1.5 shapes: 4x128x128
latents, an 8x8 map, 8 heads, 64x64 attention tokens with head dim 40, and 160 for each dot path:
it pads to 256 and shrinks the tiles). It prints registers per thread, spill
stores/loads (STL/LDL in the SASS), the shared memory the launch asks for, and for the row walks
the SASS instructions per output value in the row loop (the largest backward branch).
``--sweep`` adds the degrade forward at other strip widths and warp counts.

No timing: a guide for what to time when a GPU is lent, and a compile check the interpreter cannot
give (``tests/test_compile.py`` runs it with ``--json``). A compile error is reported in its row
and makes the exit status 1. Triton caches compiled kernels (~/.triton/cache), so a rerun with
unchanged kernels takes seconds.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sat_kernels.ops import attention_mass, blur, degrade, saliency_mask, token_probs  # noqa: E402
from sat_kernels.ops.utils import TL_DTYPE, block_d, next_pow2, row_walk_tiles  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
HALVES = (torch.float16, torch.bfloat16)
INPUT_DTYPES = (torch.float32, *HALVES, torch.float64)
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
FLOATS = {"threshold", "scale_h", "scale_w", "scale_log2", "inv_heads"}  # fp32 scalars; other scalars are i32
SIZES = {"C", "H", "W", "MAP_H", "MAP_W", "N_TOKENS", "N_QUERIES", "HEADS", "N_PLANES", "OUT_H", "OUT_W", "NQ",
         "NK", "D", "S"}  # upper-case scalar parameters (the other upper-case ones are pointers)

# SD 1.5 shapes: latents at 1024 px, the mid block's 8x8 map with 8 heads, the 64x64 layer's tokens
B, C, SIDE, MAP, HEADS, TOKENS, N_SMS = 64, 4, 128, 8, 8, 4096, 132  # N_SMS: an H100
HEAD_DIMS = (40, 160)  # SD 1.5's smallest head and its widest (pads to 256: the shared-memory limit)


def signature(fn, **pointers: str) -> dict:
    """Triton's signature of ``fn``: the given pointer types, fp32 for the float scalars, i32 for
    the other scalars (sizes and strides). Constexprs are added by compile_variant."""
    params = [p.name for p in fn.params if not p.is_constexpr]
    missing = [name for name in params if name.isupper() and name not in pointers and name not in SIZES]
    assert not missing, f"{fn.__name__}: no pointer type for {missing}"
    return {name: pointers.get(name, "fp32" if name in FLOATS else "i32") for name in params}


def variant(label, fn, pointers, constexprs, warps, stages=1, dtype=torch.float32, per_thread=None):
    """One compile: ``dtype`` names the inputs' dtype; ``per_thread`` output values per thread of a
    row walk (None for the attention kernels)."""
    return dict(label=f"{label}, {NAMES[dtype]}", kernel=fn.__name__, fn=fn, signature=signature(fn, **pointers),
                constexprs=constexprs, warps=warps, stages=stages, dtype=NAMES[dtype], per_thread=per_thread)


def row_walk_variants(sweep: bool):
    """The blur and the degrade (forward, backward) at the launchers' CUDA tile."""
    rows, block_w, planes, warps = row_walk_tiles(SIDE, SIDE, C, "cuda")
    tile = dict(KERNEL_SIZE=9, BLOCK_ROWS=rows, BLOCK_W=block_w)
    per_thread = planes * block_w // (32 * warps)
    for dtype in INPUT_DTYPES:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        full = dtype != torch.float64  # fp64 (the fp64 compute branch): once per kernel and saliency kind
        ct = dict(COMPUTE_DTYPE=TL_DTYPE[compute])
        weights = dict(W_WEIGHTS=PTR[compute], H_WEIGHTS=PTR[compute])
        # the blur reads x and writes the compute dtype; its adjoint reads a gradient in the compute
        # dtype and writes x's dtype
        for adjoint, src, dst in [(False, dtype, compute), (True, compute, dtype)]:
            yield variant("blur adjoint" if adjoint else "blur fwd", blur._gaussian_blur_kernel,
                          dict(X=PTR[src], OUT=PTR[dst], **weights),
                          {**tile, "BLOCK_PLANES": planes, "ADJOINT": adjoint, **ct}, warps, dtype=dtype,
                          per_thread=per_thread)
        noise = dict(ALPHAS_CUMPROD=PTR[compute], TIMESTEPS="*i64")
        for is_probs in (False, True):
            for mean in (False, True):
                for write_mask in (False, True):
                    if not full and (mean != is_probs or not write_mask):
                        continue
                    if is_probs:
                        blocks = degrade.mass_reduction_blocks(MAP * MAP, MAP * MAP, rows, SIDE, MAP, MAP, mean,
                                                               False)
                    else:
                        blocks = (min(next_pow2(MAP * MAP), 1024), 1)
                    name = (f"degrade fwd, from {'probs' if is_probs else 'mass'}, "
                            f"{'mean' if mean else 'constant'} threshold{', mask' if write_mask else ''}")
                    yield variant(name, degrade._degrade_fwd_kernel,
                                  dict(X0=PTR[dtype], EPS=PTR[dtype], SALIENCY=PTR[dtype], OUT=PTR[compute],
                                       MASK="*u8" if write_mask else PTR[compute], **noise, **weights),
                                  {**tile, "BLOCK_C": planes, "BLOCK_TOKENS": blocks[0], "BLOCK_Q": blocks[1],
                                   "IS_PROBS": is_probs, "MEAN_THRESHOLD": mean, "WRITE_MASK": write_mask, **ct},
                                  warps, dtype=dtype, per_thread=per_thread)
        # the double backward's degrade: the saved (B, H*W) uint8 mask as the saliency, threshold 0.5
        for write_mask in (False, True) if full else (False,):
            yield variant(f"degrade fwd, from the saved mask{', mask' if write_mask else ''}",
                          degrade._degrade_fwd_kernel,
                          dict(X0=PTR[dtype], EPS=PTR[dtype], SALIENCY="*u8", OUT=PTR[compute],
                               MASK="*u8" if write_mask else PTR[compute], **noise, **weights),
                          {**tile, "BLOCK_C": planes, "BLOCK_TOKENS": 1024, "BLOCK_Q": 1, "IS_PROBS": False,
                           "MEAN_THRESHOLD": False, "WRITE_MASK": write_mask, **ct},
                          warps, dtype=dtype, per_thread=per_thread)
        for need_x0, need_eps in [(True, True), (True, False), (False, True)][:3 if full else 1]:
            name = "degrade bwd, " + " and ".join(n for n, need in [("d_x0", need_x0), ("d_eps", need_eps)] if need)
            yield variant(name, degrade._degrade_bwd_kernel,
                          dict(GRAD=PTR[compute], MASK="*u8" if need_x0 else PTR[compute], GRAD_X0=PTR[dtype],
                               GRAD_EPS=PTR[dtype], **noise, **weights),
                          {**tile, "BLOCK_C": planes, "NEED_X0": need_x0, "NEED_EPS": need_eps, **ct}, warps,
                          dtype=dtype, per_thread=per_thread)
    if sweep:
        for width in (32, 64, 128):
            for w in (1, 2, 4, 8):
                yield variant(f"degrade fwd, from mass, BLOCK_W={width} warps={w}", degrade._degrade_fwd_kernel,
                              dict(X0="*fp32", EPS="*fp32", SALIENCY="*fp32", OUT="*fp32", MASK="*u8",
                                   ALPHAS_CUMPROD="*fp32", TIMESTEPS="*i64", W_WEIGHTS="*fp32", H_WEIGHTS="*fp32"),
                              {**tile, "BLOCK_W": width, "BLOCK_C": planes, "BLOCK_TOKENS": 64, "BLOCK_Q": 1,
                               "IS_PROBS": False, "MEAN_THRESHOLD": False, "WRITE_MASK": True,
                               "COMPUTE_DTYPE": TL_DTYPE[torch.float32]}, w,
                              per_thread=max(1, planes * width // (32 * w)))


def attention_variants():
    """The attention statistics and the saliency mask at SD 1.5 shapes, the launchers' CUDA tiles.

    The attention kernels compute in, and write, their output's dtype: fp32 for fp32 / fp16 / bf16
    inputs, fp64 when probs, or q or k, is float64 (reference.compute_dtype). A float64 launch
    writes OUT / LSE in fp64, reads q as the float64 q * scale * log2(e) of kernel_q_and_scale (k as
    given), and uses "ieee" dots; its scalars stay fp32 arguments (1.0: Triton passes a Python float
    as fp32), so only the pointer types and PRECISION differ from the fp32 launch.
    """
    # (q dtype, k dtype): equal pairs, and mixed pairs (fp32 dots, as for fp32; fp64 dots with a
    # float32 k, whose q kernel_q_and_scale makes float64)
    pairs = [(d, d) for d in INPUT_DTYPES] + [(torch.float16, torch.float32), (torch.float64, torch.float32)]
    block_q, block_k, warps, acc_2d = attention_mass.probs_mass_config(False)
    for dtype in INPUT_DTYPES:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        # the CUDA default, and (fp32) the interpreter's, which a config override can pick
        for acc in (acc_2d, not acc_2d) if dtype == torch.float32 else (acc_2d,):
            split = attention_mass.split_grid(2 * TOKENS // block_k, HEADS, TOKENS // block_q, N_SMS)
            yield variant(f"mass from probs{', elementwise sums' if acc else ''}",
                          attention_mass._attention_mass_probs_kernel, dict(PROBS=PTR[dtype], OUT=PTR[compute]),
                          dict(SPLIT_H=split[0], SPLIT_Q=split[1], ACC_2D=acc, BLOCK_Q=block_q, BLOCK_K=block_k),
                          warps, dtype=dtype)
    for head_dim in HEAD_DIMS:
        # the wide head changes the tiles (shared memory), not the code: its three dot paths suffice
        wide = [(d, d) for d in (torch.float32, torch.float16, torch.float64)]
        for q_dtype, k_dtype in pairs if head_dim == HEAD_DIMS[0] else wide:
            dot_f32 = not (q_dtype == k_dtype and q_dtype in HALVES)
            compute = torch.float64 if torch.float64 in (q_dtype, k_dtype) else torch.float32
            mixed = "" if q_dtype == k_dtype else f"/{NAMES[k_dtype]}"
            # a float64 launch passes kernel_q_and_scale's float64 q; lse is computed in (or read
            # as) the compute dtype
            qk = dict(Q=PTR[compute if compute == torch.float64 else q_dtype], K=PTR[k_dtype])
            stats = PTR[compute]
            kind = "fp64 dots" if compute == torch.float64 else "fp32 dots" if dot_f32 else "half dots"
            dots = f"{kind}, D={head_dim}{mixed}"
            bq, bk, w, stages = attention_mass.lse_config(head_dim, dot_f32, False)
            yield variant(f"lse, {dots}", attention_mass._attention_lse_kernel, dict(**qk, LSE=stats),
                          dict(DOT_F32=dot_f32, PRECISION=attention_mass.dot_precision(False, compute), BLOCK_Q=bq,
                               BLOCK_K=bk, BLOCK_D=block_d(head_dim)), w, stages, dtype=q_dtype)
            bq, bk, w, stages, acc, precision = attention_mass.qk_mass_config(head_dim, dot_f32, False)
            if compute == torch.float64:  # as launch_attention_mass_from_qk
                precision = attention_mass.dot_precision(False, compute)
            split = attention_mass.split_grid(2 * TOKENS // bk, HEADS, TOKENS // bq, N_SMS)
            yield variant(f"mass from q/k, {dots}", attention_mass._attention_mass_qk_kernel,
                          dict(**qk, LSE=stats, OUT=stats),
                          dict(SPLIT_H=split[0], SPLIT_Q=split[1], ACC_2D=acc, DOT_F32=dot_f32, PRECISION=precision,
                               BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=block_d(head_dim)), w, stages, dtype=q_dtype)
            bq, bs, w, stages = token_probs.token_probs_config(head_dim, 4, dot_f32, False)
            yield variant(f"token probs, {dots}", token_probs._token_probs_kernel,
                          dict(**qk, LSE=stats, TOKENS="*i64", OUT=stats),
                          dict(DOT_F32=dot_f32, BLOCK_Q=bq, BLOCK_S=bs, BLOCK_D=block_d(head_dim)), w, stages,
                          dtype=q_dtype)
    block_rows, block_cols, block_tokens = saliency_mask.mask_blocks(SIDE, SIDE, MAP * MAP, False)
    for dtype in INPUT_DTYPES:
        for mean in (False, True) if dtype != torch.float64 else (True,):
            yield variant(f"saliency mask, {'mean' if mean else 'constant'} threshold",
                          saliency_mask._saliency_mask_kernel, dict(MASS=PTR[dtype], OUT="*u8"),
                          dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, BLOCK_TOKENS=block_tokens,
                               MEAN_THRESHOLD=mean), 4, dtype=dtype)


def variants(sweep: bool) -> list[dict]:
    return [*row_walk_variants(sweep), *attention_variants()]


def sass_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, STL count, LDL count, instructions in the largest loop) via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([f"{TOOLS}/cuobjdump", "-sass", "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    code = [(int(a, 16), ins) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]+);", sass)]
    loop = 0
    for address, ins in code:
        target = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < address:  # a backward branch closes a loop
            loop = max(loop, sum(int(target.group(1), 16) <= a <= address for a, _ in code))
    ops = collections.Counter(ins.split()[0] for _, ins in code)
    return max(map(int, re.findall(r"REG:(\d+)", sass))), ops["STL"], ops["LDL"], loop


def compile_variant(index: int, arch: int, sweep: bool) -> dict:
    """Row ``index`` of the report (a worker process rebuilds the list: kernels do not pickle): the
    variant's numbers, or its compile error."""
    v = variants(sweep)[index]
    row = {k: v[k] for k in ("label", "kernel", "dtype")}
    row["constexprs"] = {k: (str(x) if not isinstance(x, (bool, int)) else x) for k, x in v["constexprs"].items()}
    row["pointers"] = {k: t for k, t in v["signature"].items() if t.startswith("*")}
    start = time.perf_counter()
    try:
        source = ASTSource(fn=v["fn"], signature={**v["signature"], **dict.fromkeys(v["constexprs"], "constexpr")},
                           constexprs=v["constexprs"])
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=v["warps"], num_stages=v["stages"]))
        regs, stl, ldl, loop = sass_usage(compiled.asm["cubin"])
    except Exception as err:  # noqa: BLE001 - a failing variant is a row of the report, not the end of it
        row["error"] = f"{type(err).__name__}: {str(err).strip()[:2000]}"
        return row
    row.update(registers=regs, spill_stores=stl, spill_loads=ldl, shared_bytes=compiled.metadata.shared,
               loop_instructions=loop, seconds=round(time.perf_counter() - start, 2))
    if v["per_thread"]:
        row["instructions_per_value"] = round(loop / v["per_thread"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant instead of a table")
    parser.add_argument("--sweep", action="store_true", help="also other strip widths / warp counts")
    args = parser.parse_args()
    rows, block_w, planes, warps = row_walk_tiles(SIDE, SIDE, C, "cuda")
    if not args.json:
        print(f"sm_{args.arch}, Triton {triton.__version__}; row-walk tile on CUDA: {rows} rows, BLOCK_W={block_w}, "
              f"{planes} planes, {warps} warps; shared memory in bytes")
    todo = variants(args.sweep)
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        results = pool.map(compile_variant, range(len(todo)), [args.arch] * len(todo), [args.sweep] * len(todo))
        failed = 0
        for row in results:
            failed += "error" in row
            if args.json:
                print(json.dumps(row), flush=True)
            elif "error" in row:
                print(f"{row['label']:58s} FAILED: {row['error'].splitlines()[0][:200]}", flush=True)
            else:
                per_value = f" ({row['instructions_per_value']:5.1f} per value)" if "instructions_per_value" in row \
                    else ""
                print(f"{row['label']:58s} registers={row['registers']:3d} spill stores={row['spill_stores']:4d} "
                      f"loads={row['spill_loads']:4d} shared={row['shared_bytes']:6d} "
                      f"loop={row['loop_instructions']:4d} instructions{per_value}", flush=True)
    if not args.json:
        print(f"{len(todo)} variants, {failed} failed, {time.perf_counter() - start:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
