"""Thresholded saliency map, optionally nearest-upsampled, in Triton (no autograd: bool output).

mask[b, y, x] = mass[b, src(y, x)] > threshold[b], threshold = a constant or the sample's mean
mass; src is torch's ``F.interpolate(mode="nearest")`` index ``min(int(dst * float32(in/out)),
in - 1)`` with the product in fp32 (the identity when no size is given: the ratio is 1).

Grid: (row tiles * column tiles of the output, B); each program computes its sample's threshold
(a sweep over the mass for "mean") and writes one (BR, BC) tile of uint8, viewed as bool.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cdiv, fp32_ratio, next_pow2

# ----------------------------------------------------------------------------- kernel


@triton.jit
def _saliency_mask_kernel(
    MASS, OUT,
    MH, MW, N, OH, OW,
    s_b, s_n,  # mass strides; OUT is contiguous (B, OH, OW) uint8
    thr, scale_h, scale_w,
    BR: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, MEAN_THR: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(0)
    n_cb = tl.cdiv(OW, BC)
    ys = (tile // n_cb).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    xs = (tile % n_cb).to(tl.int64) * BC + tl.arange(0, BC).to(tl.int64)
    mass = MASS + b * s_b
    if MEAN_THR:
        part = tl.zeros((BN,), tl.float32)
        for n0 in range(0, N, BN):
            n = n0 + tl.arange(0, BN).to(tl.int64)
            part += tl.load(mass + n * s_n, mask=n < N, other=0.0).to(tl.float32)
        t = tl.sum(part) / N
    else:
        t = thr
    sy = tl.minimum((ys.to(tl.float32) * scale_h).to(tl.int64), MH - 1)
    sx = tl.minimum((xs.to(tl.float32) * scale_w).to(tl.int64), MW - 1)
    v = tl.load((mass + sy * (MW * s_n))[:, None] + (sx * s_n)[None, :]).to(tl.float32)
    ok = (ys < OH)[:, None] & (xs < OW)[None, :]
    tl.store((OUT + b * OH * OW + ys * OW)[:, None] + xs[None, :], (v > t).to(tl.uint8), mask=ok)


# ----------------------------------------------------------------------------- launcher


def saliency_mask(mass: torch.Tensor, map_size, threshold=1.0, size=None) -> torch.Tensor:
    """reference.saliency_mask: bool (B, h, w), or (B, *size) nearest-upsampled."""
    B, N = mass.shape
    MH, MW = map_size
    OH, OW = (MH, MW) if size is None else tuple(size)
    out = torch.empty((B, OH, OW), dtype=torch.uint8, device=mass.device)
    if out.numel() == 0:
        return out.view(torch.bool)
    interp = mass.device.type != "cuda"
    BC = max(16, min(next_pow2(OW), 256 if interp else 128))
    BR = max(1, min(next_pow2(OH), (1 << 14 if interp else 1 << 12) // BC))
    BN = min(next_pow2(N), 1024)
    mean = isinstance(threshold, str)
    grid = (cdiv(OH, BR) * cdiv(OW, BC), B)
    _saliency_mask_kernel[grid](
        mass, out, MH, MW, N, OH, OW, *mass.stride(),
        0.0 if mean else float(threshold), fp32_ratio(MH, OH), fp32_ratio(MW, OW),
        BR=BR, BC=BC, BN=BN, MEAN_THR=mean, num_warps=4, num_stages=1,
    )
    return out.view(torch.bool)
