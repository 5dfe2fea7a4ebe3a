"""Separable Gaussian blur with reflect padding (SAG's ``gaussian_blur_2d``), in Triton.

Row-walk design (shared with ``degrade.py``): a program owns a strip BW columns wide and CH output
rows tall of CP planes at once, a (CP, BW) tile whose first axis is the planes. It walks down the
strip one row at a time. Each input row is blurred along W with KS loads at reflected columns (L1
hits after the first), and pushed into a ring of the last KS row-blurred rows (a tuple, kept in
registers); each output row is the tap-weighted sum of the ring. Every input value leaves DRAM
once, only the output is written, the per-thread state is KS small vectors (about 100 registers
and no spills at the GPU tile: ``benchmarks/compile_report.py``), and the sums are the reference's
shifted adds: a NaN/inf reaches exactly the outputs whose window holds it.

The backward is the exact adjoint, walked the same way: the transpose of the 1-D reflect blur is
the same gather with a few border weights changed, so both directions read their per-position
weights from ``reference.blur_gather_weights`` tables (W x KS along rows, H x KS down columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import cdiv, next_pow2

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _reflect(i, n):
    """Reflect padding without edge repeat (-1 -> 1, n -> n-2); valid for -n < i < 2n - 1."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i > n - 1, 2 * (n - 1) - i, i)


@triton.jit
def _strip_coords(H, W, CH: tl.constexpr, BW: tl.constexpr):
    """(first output row, row count, columns (BW,) int64) of this program's strip;
    program_id(0) = row chunk * column strips + strip."""
    tile = tl.program_id(0)
    n_strips = tl.cdiv(W, BW)
    y0 = (tile // n_strips) * CH
    xs = (tile % n_strips).to(tl.int64) * BW + tl.arange(0, BW).to(tl.int64)
    return y0, tl.minimum(CH, H - y0), xs


@triton.jit
def _strip(planes, ok, s_h, s_w, MSK, m_h, m_w, xs, W, HW, KS: tl.constexpr, PER_COLUMN: tl.constexpr):
    """The walk's loop invariants as one tuple: ``planes`` (CP, 1) row-0 pointers, ``ok`` (CP, BW)
    lanes to read, row strides, and per tap j the offsets of columns reflect(x + j - R) (in the
    planes and in the 0/1 plane MSK) and the weight HW[x, j]: (1, BW) where the weights differ
    per column (PER_COLUMN: the adjoint), else the scalar HW[0, j] (the forward: the taps).
    Column offsets are int32 (fewer registers; the launcher keeps a row's span below 2^31)."""
    R: tl.constexpr = KS // 2
    inside = xs < W
    x = xs.to(tl.int32)
    offs = ()
    moffs = ()
    weights = ()
    for j in tl.static_range(KS):
        col = tl.where(inside, _reflect(x + (j - R), W), 0)[None, :]  # lanes past the image read column 0
        offs = offs + (col * s_w,)
        moffs = moffs + (col * m_w,)
        if PER_COLUMN:
            weights = weights + (tl.load(HW + xs * KS + j, mask=inside, other=0.0)[None, :],)
        else:
            weights = weights + (tl.load(HW + j),)
    return planes, ok, s_h, MSK, m_h, offs, moffs, weights


@triton.jit
def _hblur_row(strip, p, H, KS: tl.constexpr, HAS_MASK: tl.constexpr, CDT: tl.constexpr):
    """Row p of the reflect-padded planes (input row reflect(p)) blurred along W: (CP, BW). With
    HAS_MASK the row is first multiplied by the 0/1 plane MSK (the degrade backward's m * g)."""
    planes, ok, s_h, MSK, m_h, offs, moffs, weights = strip
    r = _reflect(p, H).to(tl.int64)
    row = planes + r * s_h
    out = tl.zeros(ok.shape, CDT)
    for j in tl.static_range(KS):
        v = tl.load(row + offs[j], mask=ok, other=0.0).to(CDT)
        if HAS_MASK:
            v = v * tl.load(MSK + r * m_h + moffs[j], mask=ok, other=0).to(CDT)
        out += weights[j] * v
    return out


@triton.jit
def _ring_start(strip, y0, H, KS: tl.constexpr, HAS_MASK: tl.constexpr, CDT: tl.constexpr):
    """The ring before output row y0: entries 1.. are the row-blurred rows y0 - R .. y0 + R - 1
    (entry 0 is dropped by the first push)."""
    R: tl.constexpr = KS // 2
    ring = (_hblur_row(strip, y0 - R, H, KS, HAS_MASK, CDT),) * KS
    for k in range(1, KS - 1):  # a runtime loop: unrolled, its loads would all be live at once
        ring = ring[1:] + (_hblur_row(strip, y0 - R + k, H, KS, HAS_MASK, CDT),)
    return ring


@triton.jit
def _weights_at(VW, y, KS: tl.constexpr):
    """Row y of the (H, KS) vertical weights as a tuple of scalars (row 0 = the taps)."""
    w = ()
    for i in tl.static_range(KS):
        w = w + (tl.load(VW + y * KS + i),)
    return w


@triton.jit
def _vblur(ring, w, KS: tl.constexpr):
    """An output row y: sum_i w[i] * ring[i], the ring holding row-blurred rows y - R .. y + R."""
    out = w[0] * ring[0]
    for i in tl.static_range(1, KS):
        out += w[i] * ring[i]
    return out


@triton.jit
def _gaussian_blur_kernel(
    SRC, OUT, HW, VW,  # HW (W, KS) / VW (H, KS): reference.blur_gather_weights along W / H
    PLANES, C, H, W,
    s_b, s_c, s_h, s_w,  # SRC strides; OUT is contiguous (B, C, H, W)
    KS: tl.constexpr, CH: tl.constexpr, BW: tl.constexpr, CP: tl.constexpr, ADJOINT: tl.constexpr,
    CDT: tl.constexpr,
):
    # grid: (row chunks * column strips, plane groups); planes are the B * C (b, c) pairs
    R: tl.constexpr = KS // 2
    y0, n_rows, xs = _strip_coords(H, W, CH, BW)
    plane = tl.program_id(1).to(tl.int64) * CP + tl.arange(0, CP).to(tl.int64)
    ok = (plane < PLANES)[:, None] & (xs < W)[None, :]
    planes = (SRC + (plane // C) * s_b + (plane % C) * s_c)[:, None]
    out = OUT + (plane * H * W)[:, None] + xs[None, :]
    strip = _strip(planes, ok, s_h, s_w, SRC, 0, 0, xs, W, HW, KS, ADJOINT)
    ring = _ring_start(strip, y0, H, KS, False, CDT)
    w = _weights_at(VW, 0, KS)  # the taps; the adjoint's differ near the top and bottom rows
    for i in range(n_rows):
        y = y0 + i
        ring = ring[1:] + (_hblur_row(strip, y + R, H, KS, False, CDT),)
        if ADJOINT:
            w = _weights_at(VW, y, KS)
        tl.store(out + y.to(tl.int64) * W, _vblur(ring, w, KS), mask=ok)


# ----------------------------------------------------------------------------- launcher

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def gather_weights(n: int, kernel_size: int, sigma: float, adjoint: bool, device, dtype: torch.dtype):
    """reference.blur_gather_weights (cached) on ``device`` in the compute dtype."""
    return reference.blur_gather_weights(n, int(kernel_size), float(sigma), adjoint, torch.device(device), dtype)


def int32_columns(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a contiguous copy when one of its rows spans 2^31 elements or more: the walk keeps
    column offsets in int32."""
    return x.contiguous() if (x.shape[-1] - 1) * x.stride(-1) >= 2**31 else x


def tile_sizes(height: int, width: int, planes: int, device, rows: int | None = None,
               block_w: int | None = None) -> tuple[int, int, int, int]:
    """(CH rows per program, BW columns per strip, CP planes per program, num_warps).

    A GPU gets 16-row chunks of strips up to 128 columns wide, 4 planes, 2 values per thread:
    about 100 registers and no spills for sm_90 (``benchmarks/compile_report.py``), many
    programs in flight to hide the walk's load latency. Untimed choices: the bandwidth benchmark
    sweeps ``rows``. The interpreter pays per program and per op, so it walks whole planes in
    wide tiles.
    """
    interp = torch.device(device).type != "cuda"
    if rows is None:
        rows = max(1, height) if interp else 16
    if block_w is None:
        block_w = min(256 if interp else 128, next_pow2(width))
    cp = min(next_pow2(planes), 16 if interp else 4)
    return rows, block_w, cp, max(1, min(8, cp * block_w // 64))


def blur_launch(x: torch.Tensor, kernel_size: int, sigma: float, adjoint: bool, out_dtype: torch.dtype,
                rows: int | None = None, block_w: int | None = None) -> torch.Tensor:
    """Blur (or its adjoint) of (B, C, H, W) ``x`` in compute dtype; result stored as ``out_dtype``."""
    B, C, H, W = x.shape
    cdt = reference.compute_dtype(x)
    out = torch.empty((B, C, H, W), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    x = int32_columns(x)
    hw = gather_weights(W, kernel_size, sigma, adjoint, x.device, cdt)
    vw = gather_weights(H, kernel_size, sigma, adjoint, x.device, cdt)
    CH, BW, CP, warps = tile_sizes(H, W, B * C, x.device, rows, block_w)
    grid = (cdiv(H, CH) * cdiv(W, BW), cdiv(B * C, CP))
    _gaussian_blur_kernel[grid](
        x, out, hw, vw, B * C, C, H, W, *x.stride(),
        KS=kernel_size, CH=CH, BW=BW, CP=CP, ADJOINT=adjoint, CDT=_TL_DTYPE[cdt], num_warps=warps,
        num_stages=1,
    )
    return out


# ----------------------------------------------------------------------------- autograd


class GaussianBlurFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, sigma, rows=None, block_w=None):
        ctx.params = (kernel_size, sigma, rows, block_w, x.dtype)
        return blur_launch(x, kernel_size, sigma, False, reference.compute_dtype(x), rows, block_w)

    @staticmethod
    def backward(ctx, grad):
        kernel_size, sigma, rows, block_w, dtype = ctx.params
        return blur_launch(grad, kernel_size, sigma, True, dtype, rows, block_w), None, None, None, None


def gaussian_blur(x: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0, *, rows: int | None = None,
                  block_w: int | None = None) -> torch.Tensor:
    """(B, C, H, W) separable Gaussian blur, reflect padding; equals reference.gaussian_blur.

    ``rows`` / ``block_w`` override the rows per program and the strip width (tests use them to cross
    chunk and strip borders).
    """
    return GaussianBlurFunction.apply(x, int(kernel_size), float(sigma), rows, block_w)
