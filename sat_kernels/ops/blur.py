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
from .utils import (TL_DTYPE, blur_along_w, blur_down_h, cdiv, gather_weights, h_weights_at, int32_columns,
                    ring_before, row_walk_tiles, strip_coords, strip_invariants)

# ----------------------------------------------------------------------------- kernels


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
    y0, n_rows, xs = strip_coords(H, W, CH, BW)
    plane = tl.program_id(1).to(tl.int64) * CP + tl.arange(0, CP).to(tl.int64)
    ok = (plane < PLANES)[:, None] & (xs < W)[None, :]
    planes = (SRC + (plane // C) * s_b + (plane % C) * s_c)[:, None]
    out = OUT + (plane * H * W)[:, None] + xs[None, :]
    strip = strip_invariants(planes, ok, s_h, s_w, SRC, 0, 0, xs, W, HW, KS, ADJOINT)
    ring = ring_before(strip, y0, H, KS, False, CDT)
    w = h_weights_at(VW, 0, KS)  # the taps; the adjoint's differ near the top and bottom rows
    for i in range(n_rows):
        y = y0 + i
        ring = ring[1:] + (blur_along_w(strip, y + R, H, KS, False, CDT),)
        if ADJOINT:
            w = h_weights_at(VW, y, KS)
        tl.store(out + y.to(tl.int64) * W, blur_down_h(ring, w, KS), mask=ok)


# ----------------------------------------------------------------------------- launcher

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
    CH, BW, CP, warps = row_walk_tiles(H, W, B * C, x.device, rows, block_w)
    grid = (cdiv(H, CH) * cdiv(W, BW), cdiv(B * C, CP))
    _gaussian_blur_kernel[grid](
        x, out, hw, vw, B * C, C, H, W, *x.stride(),
        KS=kernel_size, CH=CH, BW=BW, CP=CP, ADJOINT=adjoint, CDT=TL_DTYPE[cdt], num_warps=warps,
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
