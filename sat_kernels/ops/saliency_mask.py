"""Thresholded saliency map, optionally nearest-upsampled, in Triton (no autograd: bool output).

mask[b, y, x] = mass[b, src(y, x)] > threshold[b], threshold = a constant or the sample's mean
mass; src is torch's ``F.interpolate(mode="nearest")`` index ``min(int(dst * float32(in/out)),
in - 1)`` with the product in fp32 (the identity when no size is given: the ratio is 1).

Grid: (row tiles * column tiles of the output, B); each program computes its sample's threshold
(a sweep over the mass for "mean") and writes one (BLOCK_ROWS, BLOCK_COLS) tile of uint8, viewed
as bool. A ``torch.library`` op (torch.ops.sat_kernels.saliency_mask) with a fake implementation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cdiv, custom_op, fp32_ratio, next_pow2, threshold_args, threshold_of, token_mean

# ----------------------------------------------------------------------------- kernel


@triton.jit
def _saliency_mask_kernel(
    MASS, OUT,
    MAP_H, MAP_W, N_TOKENS, OUT_H, OUT_W,
    s_b, s_n,  # MASS strides; OUT is contiguous (B, OUT_H, OUT_W) uint8
    threshold, scale_h, scale_w,  # scale_*: fp32 in/out ratios of the nearest upsample
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_TOKENS: tl.constexpr, MEAN_THRESHOLD: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(0)  # = row tile * column tiles + column tile
    n_col_tiles = tl.cdiv(OUT_W, BLOCK_COLS)
    ys = (tile // n_col_tiles).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    xs = (tile % n_col_tiles).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS).to(tl.int64)
    mass = MASS + b * s_b
    if MEAN_THRESHOLD:
        t = token_mean(mass, s_n, N_TOKENS, BLOCK_TOKENS)
    else:
        t = threshold
    # nearest source token of each output, bit-exact with torch: min(int(dst * scale), in - 1)
    src_y = tl.minimum((ys.to(tl.float32) * scale_h).to(tl.int64), MAP_H - 1)
    src_x = tl.minimum((xs.to(tl.float32) * scale_w).to(tl.int64), MAP_W - 1)
    v = tl.load((mass + src_y * (MAP_W * s_n))[:, None] + (src_x * s_n)[None, :]).to(tl.float32)
    ok = (ys < OUT_H)[:, None] & (xs < OUT_W)[None, :]
    tl.store((OUT + b * OUT_H * OUT_W + ys * OUT_W)[:, None] + xs[None, :], (v > t).to(tl.uint8), mask=ok)


# ----------------------------------------------------------------------------- launcher


def mask_blocks(out_h: int, out_w: int, n_tokens: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, BLOCK_TOKENS): output tiles of a few thousand cells (more under the
    interpreter, which pays per program), and the token block of the "mean" sweep."""
    block_cols = max(16, min(next_pow2(out_w), 256 if interpret else 128))
    block_rows = max(1, min(next_pow2(out_h), (1 << 14 if interpret else 1 << 12) // block_cols))
    return block_rows, block_cols, min(next_pow2(n_tokens), 1024)


def mask_size(map_h: int, map_w: int, size: list[int] | None) -> tuple[int, int]:
    return (map_h, map_w) if size is None else tuple(size)


@custom_op("saliency_mask")
def saliency_mask_op(mass: torch.Tensor, map_h: int, map_w: int, threshold: float, mean_threshold: bool,
                     size: list[int] | None) -> torch.Tensor:
    """reference.saliency_mask: bool (B, h, w), or (B, *size) nearest-upsampled; the threshold is
    utils.threshold_args' pair."""
    B, n_tokens = mass.shape
    out_h, out_w = mask_size(map_h, map_w, size)
    threshold = threshold_of(threshold, mean_threshold)
    out = torch.empty((B, out_h, out_w), dtype=torch.uint8, device=mass.device)
    if out.numel() == 0:
        return out.view(torch.bool)
    block_rows, block_cols, block_tokens = mask_blocks(out_h, out_w, n_tokens, mass.device.type != "cuda")
    mean = isinstance(threshold, str)
    grid = (cdiv(out_h, block_rows) * cdiv(out_w, block_cols), B)
    _saliency_mask_kernel[grid](
        mass, out, map_h, map_w, n_tokens, out_h, out_w, *mass.stride(),
        0.0 if mean else float(threshold), fp32_ratio(map_h, out_h), fp32_ratio(map_w, out_w),
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, BLOCK_TOKENS=block_tokens, MEAN_THRESHOLD=mean,
        num_warps=4, num_stages=1,
    )
    return out.view(torch.bool)


@saliency_mask_op.register_fake
def _(mass, map_h, map_w, threshold, mean_threshold, size):
    return mass.new_empty((mass.shape[0], *mask_size(map_h, map_w, size)), dtype=torch.bool)


def saliency_mask(mass: torch.Tensor, map_size, threshold=1.0, size=None) -> torch.Tensor:
    """torch.ops.sat_kernels.saliency_mask (a bool result: no autograd)."""
    return saliency_mask_op(mass.detach(), *map_size, *threshold_args(threshold), None if size is None else list(size))
