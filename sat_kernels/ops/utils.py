"""What more than one op file uses (Liger-Kernel's ``ops/utils.py``): plain-int launch arithmetic,
the "mean" threshold's sweep (``degrade.py``, ``saliency_mask.py``), the row walk's
``@triton.jit`` helpers and tile choice (``blur.py``, ``degrade.py``), and the ``tl.dot`` tile
choice of the attention statistics (``attention_mass.py``, ``token_probs.py``).

The row walk: a program owns a strip BLOCK_W columns wide and BLOCK_ROWS output rows tall of
BLOCK_PLANES planes at once, a (BLOCK_PLANES, BLOCK_W) tile whose first axis is the planes. It
walks down the strip one row at a time. Each input row is blurred along W with KERNEL_SIZE loads
at reflected columns (L1 hits after the first) and pushed into a ring of the last KERNEL_SIZE
row-blurred rows (a tuple, kept in registers); each output row is the weighted sum of the ring.
Every input value leaves DRAM once, only the output is written, the per-thread state is
KERNEL_SIZE small vectors (registers and spills per kernel: ``benchmarks/compile_report.py``),
and the sums are the reference's shifted adds: a NaN/inf reaches exactly the outputs whose
window holds it.

Both directions of the blur read per-position weights from ``reference.blur_gather_weights``
tables, (W, KERNEL_SIZE) along W and (H, KERNEL_SIZE) down H: the taps for the forward, the
taps with a few border weights changed for the adjoint (the transpose of the reflect blur).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl

from .. import reference

# ----------------------------------------------------------------------------- launch arithmetic


def cdiv(a: int, b: int) -> int:
    """triton.cdiv in plain ints: Triton wraps its helper as a constexpr function whose host call
    costs more than the launchers' own arithmetic (see benchmarks/RESULTS.md, host time)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """triton.next_power_of_2 in plain ints (see cdiv): the smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=256)
def fp32_ratio(src: int, dst: int) -> float:
    """float32(src) / float32(dst) rounded like C++ float division: the scale torch's nearest
    upsample multiplies destination indices by (cached: the launchers ask on every call)."""
    return float(np.float32(src) / np.float32(dst))


# the kernels' compute dtype (reference.compute_dtype) as a Triton constexpr
TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}

# ----------------------------------------------------------------------------- saliency: jit helpers


@triton.jit
def token_mean(values, stride, n_tokens, BLOCK_TOKENS: tl.constexpr):
    """The fp32 mean of the n_tokens values at ``values + i * stride`` (the "mean" threshold of a
    mass), swept in blocks of BLOCK_TOKENS."""
    part = tl.zeros((BLOCK_TOKENS,), tl.float32)
    for n0 in range(0, n_tokens, BLOCK_TOKENS):
        tokens = n0 + tl.arange(0, BLOCK_TOKENS).to(tl.int64)
        part += tl.load(values + tokens * stride, mask=tokens < n_tokens, other=0.0).to(tl.float32)
    return tl.sum(part) / n_tokens


# ----------------------------------------------------------------------------- row walk: jit helpers


@triton.jit
def reflect(i, n):
    """Reflect padding without edge repeat (-1 -> 1, n -> n-2); valid for -n < i < 2n - 1."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i > n - 1, 2 * (n - 1) - i, i)


@triton.jit
def strip_coords(H, W, BLOCK_ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """(first output row, row count, columns (BLOCK_W,) int64) of this program's strip;
    program_id(0) = row chunk * column strips + strip."""
    tile = tl.program_id(0)
    n_strips = tl.cdiv(W, BLOCK_W)
    y0 = (tile // n_strips) * BLOCK_ROWS
    xs = (tile % n_strips).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
    return y0, tl.minimum(BLOCK_ROWS, H - y0), xs


@triton.jit
def strip_invariants(planes, ok, s_h, s_w, MASK, m_h, m_w, xs, W, W_WEIGHTS, KERNEL_SIZE: tl.constexpr,
                     PER_COLUMN: tl.constexpr):
    """The walk's loop invariants as one tuple: ``planes`` (BLOCK_PLANES, 1) row-0 pointers, ``ok``
    (BLOCK_PLANES, BLOCK_W) lanes to read, the row stride, the 0/1 plane MASK and its row stride,
    and per tap j the offsets of columns reflect(x + j - RADIUS) (in the planes and in MASK) and
    the weight W_WEIGHTS[x, j]: (1, BLOCK_W) where the weights differ per column (PER_COLUMN: the
    adjoint), else the scalar W_WEIGHTS[0, j] (the forward: the taps). Column offsets are int32
    (fewer registers; the launcher keeps a row's span below 2^31, see int32_columns)."""
    RADIUS: tl.constexpr = KERNEL_SIZE // 2
    inside = xs < W
    x = xs.to(tl.int32)
    offsets = ()
    mask_offsets = ()
    weights = ()
    for j in tl.static_range(KERNEL_SIZE):
        col = tl.where(inside, reflect(x + (j - RADIUS), W), 0)[None, :]  # lanes past the image read column 0
        offsets = offsets + (col * s_w,)
        mask_offsets = mask_offsets + (col * m_w,)
        if PER_COLUMN:
            weights = weights + (tl.load(W_WEIGHTS + xs * KERNEL_SIZE + j, mask=inside, other=0.0)[None, :],)
        else:
            weights = weights + (tl.load(W_WEIGHTS + j),)
    return planes, ok, s_h, MASK, m_h, offsets, mask_offsets, weights


@triton.jit
def blur_along_w(strip, p, H, KERNEL_SIZE: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Row p of the reflect-padded planes (input row reflect(p)) blurred along W: (BLOCK_PLANES,
    BLOCK_W). With HAS_MASK the row is first multiplied by the 0/1 plane MASK (the degrade
    backward's m * g)."""
    planes, ok, s_h, MASK, m_h, offsets, mask_offsets, weights = strip
    r = reflect(p, H).to(tl.int64)
    row = planes + r * s_h
    out = tl.zeros(ok.shape, COMPUTE_DTYPE)
    for j in tl.static_range(KERNEL_SIZE):
        v = tl.load(row + offsets[j], mask=ok, other=0.0).to(COMPUTE_DTYPE)
        if HAS_MASK:
            v = v * tl.load(MASK + r * m_h + mask_offsets[j], mask=ok, other=0).to(COMPUTE_DTYPE)
        out += weights[j] * v
    return out


@triton.jit
def ring_before(strip, y0, H, KERNEL_SIZE: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """The ring before output row y0: entries 1.. are the row-blurred rows y0 - RADIUS ..
    y0 + RADIUS - 1 (entry 0 is dropped by the first push)."""
    RADIUS: tl.constexpr = KERNEL_SIZE // 2
    ring = (blur_along_w(strip, y0 - RADIUS, H, KERNEL_SIZE, HAS_MASK, COMPUTE_DTYPE),) * KERNEL_SIZE
    for k in range(1, KERNEL_SIZE - 1):  # a runtime loop: unrolled, its loads would all be live at once
        ring = ring[1:] + (blur_along_w(strip, y0 - RADIUS + k, H, KERNEL_SIZE, HAS_MASK, COMPUTE_DTYPE),)
    return ring


@triton.jit
def h_weights_at(H_WEIGHTS, y, KERNEL_SIZE: tl.constexpr):
    """Row y of the (H, KERNEL_SIZE) weights down H as a tuple of scalars (row 0 = the taps)."""
    w = ()
    for i in tl.static_range(KERNEL_SIZE):
        w = w + (tl.load(H_WEIGHTS + y * KERNEL_SIZE + i),)
    return w


@triton.jit
def blur_down_h(ring, weights, KERNEL_SIZE: tl.constexpr):
    """Output row y: sum_i weights[i] * ring[i], the ring holding row-blurred rows y - RADIUS .. y + RADIUS."""
    out = weights[0] * ring[0]
    for i in tl.static_range(1, KERNEL_SIZE):
        out += weights[i] * ring[i]
    return out


# ----------------------------------------------------------------------------- row walk: launch helpers


def gather_weights(n: int, kernel_size: int, sigma: float, adjoint: bool, device, dtype: torch.dtype):
    """reference.blur_gather_weights (cached) on ``device`` in the compute dtype."""
    return reference.blur_gather_weights(n, int(kernel_size), float(sigma), adjoint, torch.device(device), dtype)


def int32_columns(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a contiguous copy when one of its rows spans 2^31 elements or more: the walk keeps
    column offsets in int32."""
    return x.contiguous() if (x.shape[-1] - 1) * x.stride(-1) >= 2**31 else x


def row_walk_tiles(height: int, width: int, planes: int, device, rows: int | None = None,
                   block_w: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_ROWS, BLOCK_W, BLOCK_PLANES, num_warps) of the row walk.

    A GPU gets 16-row chunks of strips up to 128 columns wide, 4 planes, 2 values per thread: no
    spills for sm_90 (``benchmarks/compile_report.py``) and many programs in flight to hide the
    walk's load latency. Untimed choices: the bandwidth benchmark sweeps ``rows``. The interpreter
    pays per program and per op, so it walks whole planes in wide tiles.
    """
    interp = torch.device(device).type != "cuda"
    if rows is None:
        rows = max(1, height) if interp else 16
    if block_w is None:
        block_w = min(256 if interp else 128, next_pow2(width))
    block_planes = min(next_pow2(planes), 16 if interp else 4)
    return rows, block_w, block_planes, max(1, min(8, block_planes * block_w // 64))


# ----------------------------------------------------------------------------- attention tiles

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


def interpreting(t: torch.Tensor) -> bool:
    """Triton's CPU interpreter runs CPU tensors (TRITON_INTERPRET=1 is checked by the caller)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or t.device.type != "cuda"


def dot_in_f32(*tensors: torch.Tensor) -> bool:
    """Upcast tiles to the compute dtype before tl.dot (the kernels' DOT_F32: an fp32-accurate dot,
    or an fp64 one for float64 inputs, reference.compute_dtype).

    Always under the interpreter (its bf16 tl.dot is wrong), for fp32/fp64 inputs, and for mixed
    dtypes; fp16/bf16 pairs on GPU use the tensor cores with fp32 accumulation (products of two
    halves are exact in fp32, so the result still matches the fp32 reference closely).
    """
    dtypes = {t.dtype for t in tensors}
    return interpreting(tensors[0]) or len(dtypes) > 1 or not dtypes <= {torch.float16, torch.bfloat16}


def block_d(head_dim: int) -> int:
    """The head dimension padded to a power of two, masked past ``head_dim``: tl.dot needs K >= 16."""
    return max(16, next_pow2(head_dim))


def attention_tile_config(padded_dim: int, block_q: int, block_k: int, warps: int, stages: int = 3,
                          min_k: int = 32, *, dot_f32: bool, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_K, num_warps, num_stages) for the q.k^T tile loops over a head dimension
    padded to ``padded_dim`` (block_d).

    Small tiles under the interpreter (each op costs time there). On GPU, the given tensor-core
    tiles, shrunk (stages first, then BLOCK_K, then BLOCK_Q) until the pipelined q and k tiles of
    a wide head (D=160 pads to 256) fit ~160 KiB of shared memory; BLOCK_K stays >= min_k.
    """
    if interpret:
        return 32, 32, 4, 1
    # shared-memory bytes per tile element: fp32 "tf32x3" tiles are kept as hi + lo halves
    elem = 8 if dot_f32 else 2
    budget = 160 * 1024
    while (block_q + block_k) * padded_dim * elem * stages > budget:
        if stages > 2:
            stages -= 1
        elif block_k > min_k:
            block_k //= 2
        elif block_q > 32:
            block_q //= 2
        else:
            stages = 1
            break
    return block_q, block_k, warps, stages


# ----------------------------------------------------------------------------- torch.library ops

LIBRARY = "sat_kernels"  # the ops are torch.ops.sat_kernels.<name>


def custom_op(name: str):
    """``torch.library.custom_op("sat_kernels::<name>")`` for a launcher that writes only fresh
    tensors: dynamo puts each call into a compiled graph as one node (with the op's fake
    implementation for shapes) instead of tracing into the launcher's Python."""
    return torch.library.custom_op(f"{LIBRARY}::{name}", mutates_args=())


def no_tensor(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The empty tensor an op returns in place of an output it did not compute: an op's outputs
    are tensors, never None (``or_none`` turns it back)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def or_none(t: torch.Tensor, computed: bool) -> torch.Tensor | None:
    """``t`` when the op computed it, else None (see no_tensor)."""
    return t if computed else None


def threshold_args(threshold: float | str) -> tuple[float, bool]:
    """(value, mean): an op's schema has no float-or-str, so the "mean" threshold is a flag."""
    return (0.0, True) if isinstance(threshold, str) else (float(threshold), False)


def threshold_of(value: float, mean: bool) -> float | str:
    """The launchers' threshold from threshold_args' pair."""
    return "mean" if mean else value
