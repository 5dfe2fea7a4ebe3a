"""SAT/SAG latent degradation in ONE Triton launch (forward), with its backward.

    x_deg = sqrt(ab_t) * (m * blur(x0) + (1 - m) * x0) + sqrt(1 - ab_t) * eps

m is the thresholded saliency map (mass > threshold, or > the sample's mean mass) upsampled to
(H, W) exactly like ``F.interpolate(mode="nearest")``: source index
``min(floor(dst * float32(in / out)), in - 1)``, the product taken in fp32.

Grid: (row chunks * column strips, B, channel groups). A program walks one strip of one sample
down CH rows with up to 4 channels at once (a (CP, BW) tile, as in ``blur.py``), so the
per-sample work happens once per program:
  1. what the mask needs. From a mass (B, h*w): the threshold (one sweep for "mean"). From
     probabilities (B, heads, N, N), any strides: the program reduces mass[j] = mean_heads
     sum_queries P[b, :, :, j] itself, only for the contiguous token range its rows can touch
     (all N tokens for "mean"), and thresholds it.
  2. sqrt(ab_t), sqrt(1 - ab_t) from alphas_cumprod[timesteps[b]].
  3. per row: the blurred row (``blur.py``'s ring of row-blurred rows), the mask row (a gather
     of the mass, or of the thresholded tokens with ``tl.gather``), blend with x0, re-noise with
     eps, store.
The backward is one launch too: d_eps = sqrt(1 - ab) g and
d_x0 = sqrt(ab) (blur_adjoint(m g) + (1 - m) g), with m saved by the forward as a (B, H, W)
uint8 plane (written by the same forward launch, only when x0 needs a gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .utils import (TL_DTYPE, blur_along_w, blur_down_h, cdiv, fp32_ratio, gather_weights, h_weights_at, int32_columns,
                    next_pow2, ring_before, row_walk_tiles, strip_coords, strip_invariants)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _noise_scales(AC, TS, s_ac, b, CDT: tl.constexpr):
    """sqrt(ab), sqrt(1 - ab) for ab = alphas_cumprod[timesteps[b]], in the compute dtype."""
    ab = tl.load(AC + tl.load(TS + b) * s_ac).to(CDT)
    if CDT == tl.float64:  # fp64 sqrt is IEEE-rounded; sqrt_rn is fp32-only
        sa = tl.sqrt(ab)
        sb = tl.sqrt(1.0 - ab)
    else:  # tl.sqrt may be approximate in fp32 on GPU
        sa = tl.sqrt_rn(ab)
        sb = tl.sqrt_rn(1.0 - ab)
    return sa, sb


@triton.jit
def _degrade_fwd_kernel(
    X0, EPS, SAL, AC, TS, HW, VW, OUT, MASK,  # HW / VW: blur weights along W / H (see blur.py)
    C, H, W, MH, MW, N, NQ, HEADS,
    sx_b, sx_c, sx_h, sx_w,
    se_b, se_c, se_h, se_w,
    ss_b, ss_h, ss_q, ss_k,  # saliency strides: (b, -, -, token) for a mass, (b, head, query, key) for probs
    s_ac, thr, scale_h, scale_w,  # scale_*: fp32 in/out ratios of the nearest upsample
    KS: tl.constexpr, CH: tl.constexpr, BW: tl.constexpr, CP: tl.constexpr, TOKS: tl.constexpr, BQ: tl.constexpr,
    IS_PROBS: tl.constexpr, MEAN_THR: tl.constexpr, WRITE_MASK: tl.constexpr, CDT: tl.constexpr,
):
    # grid: (row chunks * column strips, B, channel groups); a (CP, BW) tile walks CH rows
    R: tl.constexpr = KS // 2
    b = tl.program_id(1).to(tl.int64)
    y0, n_rows, xs = strip_coords(H, W, CH, BW)
    ch = tl.program_id(2).to(tl.int64) * CP + tl.arange(0, CP).to(tl.int64)
    ok = (ch < C)[:, None] & (xs < W)[None, :]
    # nearest source token column of each pixel, bit-exact with torch: min(int(dst * scale), in - 1)
    sx = tl.minimum((xs.to(tl.float32) * scale_w).to(tl.int64), MW - 1)
    sal = SAL + b * ss_b

    # ---- 1. what the mask rows need. From probabilities (B, heads, N, N), any strides: the
    # program reduces mass[j] = mean_heads sum_queries P[b, :, :, j] itself, only for the
    # contiguous token range its rows can touch (all N tokens for "mean"), and thresholds it.
    # From a mass (B, h*w): the threshold (one sweep for "mean"); rows gather the mass.
    if IS_PROBS:
        if MEAN_THR:
            n_lo = 0
        else:
            n_lo = tl.minimum((y0.to(tl.float32) * scale_h).to(tl.int64), MH - 1) * MW
        n = n_lo + tl.arange(0, TOKS).to(tl.int64)
        n_ok = n < N
        acc = tl.zeros((TOKS,), tl.float32)
        for hh in range(HEADS):
            for q0 in range(0, NQ, BQ):
                qq = q0 + tl.arange(0, BQ).to(tl.int64)
                ptrs = (sal + hh * ss_h + qq * ss_q)[:, None] + (n * ss_k)[None, :]
                blk = tl.load(ptrs, mask=(qq < NQ)[:, None] & n_ok[None, :], other=0.0)
                acc += tl.sum(blk.to(tl.float32), axis=0)
        mass = acc / HEADS  # mean over heads of the per-head query sums
        if MEAN_THR:
            t = tl.sum(mass) / N
        else:
            t = thr
        hot = (mass > t).to(CDT)
    else:
        if MEAN_THR:
            part = tl.zeros((TOKS,), tl.float32)
            for n0 in range(0, N, TOKS):
                n = n0 + tl.arange(0, TOKS).to(tl.int64)
                part += tl.load(sal + n * ss_k, mask=n < N, other=0.0).to(tl.float32)
            t = tl.sum(part) / N
        else:
            t = thr

    # ---- 2. re-noise scales
    sa, sb = _noise_scales(AC, TS, s_ac, b, CDT)

    # ---- 3. walk the strip: blur row (blur.py), mask row, blend with x0, re-noise with eps, store
    x_planes = (X0 + b * sx_b + ch * sx_c)[:, None]
    e_planes = (EPS + b * se_b + ch * se_c)[:, None]
    out = OUT + ((b * C + ch) * H * W)[:, None] + xs[None, :]
    strip = strip_invariants(x_planes, ok, sx_h, sx_w, X0, 0, 0, xs, W, HW, KS, False)
    ring = ring_before(strip, y0, H, KS, False, CDT)
    taps = h_weights_at(VW, 0, KS)
    for i in range(n_rows):
        y = y0 + i
        ring = ring[1:] + (blur_along_w(strip, y + R, H, KS, False, CDT),)
        blurred = blur_down_h(ring, taps, KS)
        tok = tl.minimum((y.to(tl.float32) * scale_h).to(tl.int64), MH - 1) * MW + sx  # (BW,)
        if IS_PROBS:  # spread token values to pixels: a gather along the token axis
            m = tl.gather(hot, tl.minimum(tl.maximum(tok - n_lo, 0), TOKS - 1).to(tl.int32), 0)[None, :]
        else:
            m = (tl.load(sal + tok * ss_k).to(tl.float32) > t).to(CDT)[None, :]
        y64 = y.to(tl.int64)
        xc = tl.load(x_planes + y64 * sx_h + xs[None, :] * sx_w, mask=ok, other=0.0).to(CDT)
        e = tl.load(e_planes + y64 * se_h + xs[None, :] * se_w, mask=ok, other=0.0).to(CDT)
        tl.store(out + y64 * W, sa * (m * blurred + (1.0 - m) * xc) + sb * e, mask=ok)
        if WRITE_MASK:  # saved for the backward, by one channel group
            if tl.program_id(2) == 0:
                tl.store(MASK + (b * H + y64) * W + xs[None, :], m.to(tl.uint8), mask=(xs < W)[None, :])


@triton.jit
def _degrade_bwd_kernel(
    G, MASK, AC, TS, HW, VW, DX0, DEPS,  # HW / VW: the blur's adjoint weights
    C, H, W,
    sg_b, sg_c, sg_h, sg_w,  # grad strides; DX0 / DEPS are contiguous (B, C, H, W)
    s_ac,
    KS: tl.constexpr, CH: tl.constexpr, BW: tl.constexpr, CP: tl.constexpr,
    NEED_X0: tl.constexpr, NEED_EPS: tl.constexpr, CDT: tl.constexpr,
):
    R: tl.constexpr = KS // 2
    b = tl.program_id(1).to(tl.int64)
    y0, n_rows, xs = strip_coords(H, W, CH, BW)
    ch = tl.program_id(2).to(tl.int64) * CP + tl.arange(0, CP).to(tl.int64)
    ok = (ch < C)[:, None] & (xs < W)[None, :]
    sa, sb = _noise_scales(AC, TS, s_ac, b, CDT)
    g_planes = (G + b * sg_b + ch * sg_c)[:, None]
    mplane = MASK + b * H * W
    dst = ((b * C + ch) * H * W)[:, None] + xs[None, :]
    if NEED_X0:  # the masked blur's adjoint blur^T(m * g): the walk reads m along with g
        strip = strip_invariants(g_planes, ok, sg_h, sg_w, mplane, W, 1, xs, W, HW, KS, True)
        ring = ring_before(strip, y0, H, KS, True, CDT)
    for i in range(n_rows):
        y = y0 + i
        y64 = y.to(tl.int64)
        gc = tl.load(g_planes + y64 * sg_h + xs[None, :] * sg_w, mask=ok, other=0.0).to(CDT)
        if NEED_X0:
            ring = ring[1:] + (blur_along_w(strip, y + R, H, KS, True, CDT),)
            mc = tl.load(mplane + y64 * W + xs[None, :], mask=(xs < W)[None, :], other=0).to(CDT)
            tl.store(DX0 + dst + y64 * W, sa * (blur_down_h(ring, h_weights_at(VW, y, KS), KS) + (1.0 - mc) * gc), mask=ok)
        if NEED_EPS:
            tl.store(DEPS + dst + y64 * W, sb * gc, mask=ok)


# ----------------------------------------------------------------------------- launchers


def _probs_blocks(n: int, nq: int, rows: int, height: int, map_h: int, map_w: int, mean: bool,
                  interp: bool) -> tuple[int, int]:
    """(TOKS, BQ) for the in-kernel mass reduction over probabilities."""
    if mean:
        toks = next_pow2(n)
    else:  # distinct source rows among `rows` consecutive pixel rows <= rows * h // H + 2
        token_rows = min(map_h, rows * map_h // height + 2)
        toks = next_pow2(token_rows * map_w)
    budget = (1 << 15) if interp else (1 << 12)  # elements per (query block x token) load
    bq = max(1, min(next_pow2(nq), budget // toks))
    return toks, bq


def degrade_forward(x0, eps, saliency, heads, map_size, alphas_cumprod, timesteps, threshold,
                    kernel_size, sigma, write_mask, rows=None, block_w=None):
    """Launch the fused forward; returns (out, mask (B, H, W) uint8 or None)."""
    B, C, H, W = x0.shape
    MH, MW = map_size
    cdt = reference.compute_dtype(x0)
    dev = x0.device
    interp = dev.type != "cuda"
    out = torch.empty((B, C, H, W), dtype=cdt, device=dev)
    mask = torch.empty((B, H, W), dtype=torch.uint8, device=dev) if write_mask else out
    CH, BW, CP, warps = row_walk_tiles(H, W, C, dev, rows, block_w)
    mean = isinstance(threshold, str)
    if heads is not None:  # probabilities (B, heads, Nq, N), any strides
        if saliency.dim() == 3:  # (B*heads, Nq, N), head_to_batch_dim layout: splitting dim 0 is a view
            saliency = saliency.unflatten(0, (B, heads))
        probs = saliency
        nq, n = probs.shape[-2:]
        TOKS, BQ = _probs_blocks(n, nq, CH, H, MH, MW, mean, interp)
        sal_strides = probs.stride()
    else:  # mass (B, N)
        n, nq = saliency.shape[1], 1
        TOKS, BQ = min(next_pow2(n), 1024), 1
        sal_strides = (saliency.stride(0), 0, 0, saliency.stride(1))
    if out.numel() == 0:
        return out, (mask if write_mask else None)
    x0, eps = int32_columns(x0), int32_columns(eps)
    grid = (cdiv(H, CH) * cdiv(W, BW), B, cdiv(C, CP))
    _degrade_fwd_kernel[grid](
        x0, eps, saliency, alphas_cumprod, timesteps, gather_weights(W, kernel_size, sigma, False, dev, cdt),
        gather_weights(H, kernel_size, sigma, False, dev, cdt), out, mask,
        C, H, W, MH, MW, n, nq, heads or 1,
        *x0.stride(), *eps.stride(), *sal_strides,
        alphas_cumprod.stride(0), 0.0 if mean else float(threshold), fp32_ratio(MH, H), fp32_ratio(MW, W),
        KS=kernel_size, CH=CH, BW=BW, CP=CP, TOKS=TOKS, BQ=BQ,
        IS_PROBS=heads is not None, MEAN_THR=mean, WRITE_MASK=write_mask, CDT=TL_DTYPE[cdt],
        num_warps=warps, num_stages=1,
    )
    return out, (mask if write_mask else None)


def degrade_backward(grad, mask, alphas_cumprod, timesteps, kernel_size, sigma, need_x0, need_eps,
                     x0_dtype, eps_dtype, rows=None, block_w=None):
    """One launch: (d_x0 or None, d_eps or None), in the inputs' dtypes."""
    B, C, H, W = grad.shape
    cdt = reference.compute_dtype(grad)
    dev = grad.device
    dx0 = torch.empty((B, C, H, W), dtype=x0_dtype, device=dev) if need_x0 else None
    deps = torch.empty((B, C, H, W), dtype=eps_dtype, device=dev) if need_eps else None
    if grad.numel() == 0:
        return dx0, deps
    CH, BW, CP, warps = row_walk_tiles(H, W, C, dev, rows, block_w)
    grad = int32_columns(grad)
    grid = (cdiv(H, CH) * cdiv(W, BW), B, cdiv(C, CP))
    dummy = grad
    _degrade_bwd_kernel[grid](
        grad, mask if need_x0 else dummy, alphas_cumprod, timesteps,
        gather_weights(W, kernel_size, sigma, True, dev, cdt), gather_weights(H, kernel_size, sigma, True, dev, cdt),
        dx0 if need_x0 else dummy, deps if need_eps else dummy,
        C, H, W, *grad.stride(), alphas_cumprod.stride(0),
        KS=kernel_size, CH=CH, BW=BW, CP=CP, NEED_X0=need_x0, NEED_EPS=need_eps, CDT=TL_DTYPE[cdt],
        num_warps=warps, num_stages=1,
    )
    return dx0, deps


# ----------------------------------------------------------------------------- autograd


class DegradeLatentsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, eps, saliency, heads, map_size, alphas_cumprod, timesteps, threshold,
                kernel_size, sigma, rows=None, block_w=None):
        need_x0 = ctx.needs_input_grad[0]
        out, mask = degrade_forward(x0, eps, saliency, heads, map_size, alphas_cumprod, timesteps,
                                    threshold, kernel_size, sigma, need_x0, rows, block_w)
        ctx.save_for_backward(mask if need_x0 else None, alphas_cumprod, timesteps)
        ctx.params = (kernel_size, sigma, x0.dtype, eps.dtype, rows, block_w)
        return out

    @staticmethod
    def backward(ctx, grad):
        mask, alphas_cumprod, timesteps = ctx.saved_tensors
        kernel_size, sigma, x0_dtype, eps_dtype, rows, block_w = ctx.params
        need_x0, need_eps = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx0, deps = degrade_backward(grad, mask, alphas_cumprod, timesteps, kernel_size, sigma,
                                     need_x0, need_eps, x0_dtype, eps_dtype, rows, block_w)
        return (dx0, deps) + (None,) * 10


def degrade_latents(x0, eps, saliency, heads, map_size, alphas_cumprod, timesteps, threshold=1.0,
                    kernel_size=9, sigma=1.0, *, rows=None, block_w=None):
    """reference.degrade_latents in one launch. ``saliency``: mass (B, h*w) with heads=None, or
    probabilities (B, heads, N, N) (any strides) with ``heads``. ``rows``/``block_w`` override
    the tile (tests use them to cross tile borders)."""
    if torch.is_grad_enabled() and (x0.requires_grad or eps.requires_grad):
        return DegradeLatentsFunction.apply(x0, eps, saliency, heads, tuple(map_size), alphas_cumprod,
                                            timesteps, threshold, int(kernel_size), float(sigma), rows, block_w)
    # nothing to differentiate: skip autograd's bookkeeping (~20 us a call) and the saved mask
    return degrade_forward(x0, eps, saliency, heads, tuple(map_size), alphas_cumprod, timesteps, threshold,
                           int(kernel_size), float(sigma), False, rows, block_w)[0]
