"""Separable Gaussian blur with reflect padding (SAG's ``gaussian_blur_2d``), in Triton.

The row walk of ``utils.py`` (shared with ``degrade.py``): a program walks a strip of BLOCK_PLANES
planes down BLOCK_ROWS rows, blurring each input row along W and keeping the last KERNEL_SIZE of
them in a ring; each output row is the weighted sum of the ring. The sums are the reference's
shifted adds, so a NaN/inf reaches exactly the outputs whose window holds it.

The backward is the exact adjoint, walked the same way with the adjoint's gather weights (the
transpose of the 1-D reflect blur is the same gather with a few border weights changed). Each
direction is a ``torch.library`` op (torch.ops.sat_kernels.gaussian_blur / gaussian_blur_adjoint)
whose autograd is the other op, so gradients are differentiable and dynamo sees one graph node.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .utils import (TL_DTYPE, blur_along_w, blur_down_h, cdiv, gather_weights, h_weights_at, int32_columns,
                    custom_op, ring_before, row_walk_tiles, strip_coords, strip_invariants)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _gaussian_blur_kernel(
    X, OUT, W_WEIGHTS, H_WEIGHTS,  # (W, KERNEL_SIZE) / (H, KERNEL_SIZE): reference.blur_gather_weights
    N_PLANES, C, H, W,
    s_b, s_c, s_h, s_w,  # X strides; OUT is contiguous (B, C, H, W)
    KERNEL_SIZE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_PLANES: tl.constexpr,
    ADJOINT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    # grid: (row chunks * column strips, plane groups); planes are the B * C (b, c) pairs
    RADIUS: tl.constexpr = KERNEL_SIZE // 2
    y0, n_rows, xs = strip_coords(H, W, BLOCK_ROWS, BLOCK_W)
    plane = tl.program_id(1).to(tl.int64) * BLOCK_PLANES + tl.arange(0, BLOCK_PLANES).to(tl.int64)
    ok = (plane < N_PLANES)[:, None] & (xs < W)[None, :]
    planes = (X + (plane // C) * s_b + (plane % C) * s_c)[:, None]
    out = OUT + (plane * H * W)[:, None] + xs[None, :]
    strip = strip_invariants(planes, ok, s_h, s_w, X, 0, 0, xs, W, W_WEIGHTS, KERNEL_SIZE, ADJOINT)
    ring = ring_before(strip, y0, H, KERNEL_SIZE, False, COMPUTE_DTYPE)
    weights = h_weights_at(H_WEIGHTS, 0, KERNEL_SIZE)  # the taps; the adjoint's differ near the top and bottom
    for i in range(n_rows):
        y = y0 + i
        ring = ring[1:] + (blur_along_w(strip, y + RADIUS, H, KERNEL_SIZE, False, COMPUTE_DTYPE),)
        if ADJOINT:
            weights = h_weights_at(H_WEIGHTS, y, KERNEL_SIZE)
        tl.store(out + y.to(tl.int64) * W, blur_down_h(ring, weights, KERNEL_SIZE), mask=ok)


# ----------------------------------------------------------------------------- launchers


def _launch(x: torch.Tensor, kernel_size: int, sigma: float, adjoint: bool, out_dtype: torch.dtype,
            rows: int | None, block_w: int | None) -> torch.Tensor:
    B, C, H, W = x.shape
    compute_dtype = reference.compute_dtype(x)
    out = torch.empty((B, C, H, W), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    x = int32_columns(x)
    w_weights = gather_weights(W, kernel_size, sigma, adjoint, x.device, compute_dtype)
    h_weights = gather_weights(H, kernel_size, sigma, adjoint, x.device, compute_dtype)
    block_rows, block_width, block_planes, warps = row_walk_tiles(H, W, B * C, x.device, rows, block_w)
    grid = (cdiv(H, block_rows) * cdiv(W, block_width), cdiv(B * C, block_planes))
    _gaussian_blur_kernel[grid](
        x, out, w_weights, h_weights, B * C, C, H, W, *x.stride(),
        KERNEL_SIZE=kernel_size, BLOCK_ROWS=block_rows, BLOCK_W=block_width, BLOCK_PLANES=block_planes,
        ADJOINT=adjoint, COMPUTE_DTYPE=TL_DTYPE[compute_dtype], num_warps=warps, num_stages=1,
    )
    return out


def gaussian_blur_forward(x: torch.Tensor, kernel_size: int, sigma: float, rows: int | None = None,
                          block_w: int | None = None) -> torch.Tensor:
    """The blur of (B, C, H, W) ``x``, in (and stored as) its compute dtype."""
    return _launch(x, kernel_size, sigma, False, reference.compute_dtype(x), rows, block_w)


def gaussian_blur_backward(grad: torch.Tensor, kernel_size: int, sigma: float, out_dtype: torch.dtype,
                           rows: int | None = None, block_w: int | None = None) -> torch.Tensor:
    """The blur's adjoint applied to ``grad`` (the gradient of the input), stored as ``out_dtype``."""
    return _launch(grad, kernel_size, sigma, True, out_dtype, rows, block_w)


# ----------------------------------------------------------------------------- ops and autograd


@custom_op("gaussian_blur")
def gaussian_blur_op(x: torch.Tensor, kernel_size: int, sigma: float, rows: int | None,
                     block_w: int | None) -> torch.Tensor:
    """The blur as torch.ops.sat_kernels.gaussian_blur; its backward is gaussian_blur_adjoint_op."""
    return gaussian_blur_forward(x, kernel_size, sigma, rows, block_w)


@custom_op("gaussian_blur_adjoint")
def gaussian_blur_adjoint_op(grad: torch.Tensor, kernel_size: int, sigma: float, out_dtype: torch.dtype,
                             rows: int | None, block_w: int | None) -> torch.Tensor:
    """The blur's adjoint B^T applied to a gradient. It is linear, so its own backward is the
    adjoint of B^T, the blur B: any order of derivative is exact, as on the torch backend."""
    return gaussian_blur_backward(grad, kernel_size, sigma, out_dtype, rows, block_w)


@gaussian_blur_op.register_fake
def _(x, kernel_size, sigma, rows, block_w):
    return x.new_empty(x.shape, dtype=reference.compute_dtype(x))


@gaussian_blur_adjoint_op.register_fake
def _(grad, kernel_size, sigma, out_dtype, rows, block_w):
    return grad.new_empty(grad.shape, dtype=out_dtype)


def _save_blur_params(ctx, inputs, output):
    """Both ops' inputs are (tensor, kernel_size, sigma, [out_dtype,] rows, block_w)."""
    ctx.x_dtype, ctx.params, ctx.tiles = inputs[0].dtype, inputs[1:3], inputs[-2:]


def _blur_backward(ctx, grad):
    return (gaussian_blur_adjoint_op(grad, *ctx.params, ctx.x_dtype, *ctx.tiles),) + (None,) * 4


def _adjoint_backward(ctx, grad_of_grad):
    # grad_of_grad has x's dtype; the blur returns its compute dtype, which is grad's
    return (gaussian_blur_op(grad_of_grad, *ctx.params, *ctx.tiles),) + (None,) * 5


gaussian_blur_op.register_autograd(_blur_backward, setup_context=_save_blur_params)
gaussian_blur_adjoint_op.register_autograd(_adjoint_backward, setup_context=_save_blur_params)


def gaussian_blur(x: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0, *, rows: int | None = None,
                  block_w: int | None = None) -> torch.Tensor:
    """(B, C, H, W) separable Gaussian blur, reflect padding; equals reference.gaussian_blur.

    ``rows`` / ``block_w`` override the rows per program and the strip width (tests use them to cross
    chunk and strip borders).
    """
    return gaussian_blur_op(x, int(kernel_size), float(sigma), rows, block_w)
