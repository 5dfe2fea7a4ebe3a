"""SAT/SAG latent degradation in ONE Triton launch (forward), with its backward.

    x_deg = sqrt(ab_t) * (m * blur(x0) + (1 - m) * x0) + sqrt(1 - ab_t) * eps

m is the thresholded saliency map (mass > threshold, or > the sample's mean mass) upsampled to
(H, W) exactly like ``F.interpolate(mode="nearest")``: source index
``min(floor(dst * float32(in / out)), in - 1)``, the product taken in fp32.

Grid: (row tiles * column tiles, B). A program owns one (ROWS, BW) pixel tile of one sample and
loops over its C channels, so the per-sample work happens once per program:
  1. saliency -> mask tile. From a mass (B, h*w): one gather per pixel (plus a sweep for the
     "mean" threshold). From probabilities (B, heads, N, N), any strides: the program reduces
     mass[j] = mean_heads sum_queries P[b, :, :, j] itself, only for the contiguous token range
     its rows can touch (all N tokens for "mean"), then spreads it to pixels with ``tl.gather``.
  2. sqrt(ab_t), sqrt(1 - ab_t) from alphas_cumprod[timesteps[b]].
  3. per channel: blurred tile (``blur._blur_tile``: KS horizontal gathers over ROWS + 2R halo
     rows, then a (ROWS x HALO) band-matrix ``tl.dot``; exact shifted adds for a tile that read
     a NaN/inf), blend with x0, re-noise with eps, store.
The backward is one launch too: d_eps = sqrt(1 - ab) g and
d_x0 = sqrt(ab) (blur_adjoint(m g) + (1 - m) g), with m saved by the forward as a (B, H, W)
uint8 plane (written by the same forward launch, only when x0 needs a gradient).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .. import reference
from .blur import _TL_DTYPE, _blur_tile, gaussian_taps, tile_sizes

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_coords(W, ROWS: tl.constexpr, BW: tl.constexpr):
    """(y0, x0, ys, xs) of this program's tile; int64 index math (see blur._blur_tile)."""
    tile = tl.program_id(0)
    n_cb = tl.cdiv(W, BW)
    y0 = (tile // n_cb).to(tl.int64) * ROWS
    x0 = (tile % n_cb).to(tl.int64) * BW
    ys = y0 + tl.arange(0, ROWS).to(tl.int64)
    xs = x0 + tl.arange(0, BW).to(tl.int64)
    return y0, x0, ys, xs


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
    X0, EPS, SAL, AC, TS, TAPS, OUT, MASK,
    C, H, W, MH, MW, N, NQ, HEADS,
    sx_b, sx_c, sx_h, sx_w,
    se_b, se_c, se_h, se_w,
    ss_b, ss_h, ss_q, ss_k,  # saliency strides: (b, -, -, token) for a mass, (b, head, query, key) for probs
    s_ac, thr, scale_h, scale_w,  # scale_*: fp32 in/out ratios of the nearest upsample
    KS: tl.constexpr, ROWS: tl.constexpr, HALO: tl.constexpr, BW: tl.constexpr, BORDER: tl.constexpr,
    CPP: tl.constexpr, TOKS: tl.constexpr, BQ: tl.constexpr,
    IS_PROBS: tl.constexpr, MEAN_THR: tl.constexpr, WRITE_MASK: tl.constexpr, CDT: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    y0, x0, ys, xs = _tile_coords(W, ROWS, BW)
    inside = (ys < H)[:, None] & (xs < W)[None, :]

    # nearest source token of each pixel, bit-exact with torch: min(int(dst * scale), in - 1)
    sy = tl.minimum((ys.to(tl.float32) * scale_h).to(tl.int64), MH - 1)
    sx = tl.minimum((xs.to(tl.float32) * scale_w).to(tl.int64), MW - 1)
    sal = SAL + b * ss_b

    # ---- 1. mask tile m (ROWS, BW), 0/1 in CDT
    if IS_PROBS:
        # mass of tokens [n_lo, n_lo + TOKS): the token rows this tile's pixel rows map to
        # (the launcher sizes TOKS for that), or all N tokens when the threshold is the mean
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
        # spread token values to pixels: gather along the token axis of a broadcast row
        idx = sy[:, None] * MW + sx[None, :] - n_lo
        idx = tl.minimum(tl.maximum(idx, 0), TOKS - 1).to(tl.int32)
        m = tl.gather(tl.broadcast_to(hot[None, :], (ROWS, TOKS)), idx, 1)
    else:
        if MEAN_THR:
            part = tl.zeros((TOKS,), tl.float32)
            for n0 in range(0, N, TOKS):
                n = n0 + tl.arange(0, TOKS).to(tl.int64)
                part += tl.load(sal + n * ss_k, mask=n < N, other=0.0).to(tl.float32)
            t = tl.sum(part) / N
        else:
            t = thr
        tok_ptr = (sal + sy * (MW * ss_k))[:, None] + (sx * ss_k)[None, :]
        m = (tl.load(tok_ptr).to(tl.float32) > t).to(CDT)

    c_lo = tl.program_id(2) * CPP  # this program's channels: [c_lo, c_lo + CPP)
    if WRITE_MASK:  # saved for the backward (once per pixel)
        if c_lo == 0:
            mptr = (MASK + b * H * W + ys * W)[:, None] + xs[None, :]
            tl.store(mptr, m.to(tl.uint8), mask=inside)

    # ---- 2. re-noise scales
    sa, sb = _noise_scales(AC, TS, s_ac, b, CDT)

    # ---- 3. per channel: blur, blend, re-noise
    out_row = (OUT + b * C * H * W + ys * W)[:, None] + xs[None, :]
    for c in range(c_lo, tl.minimum(c_lo + CPP, C)):
        xb = X0 + b * sx_b + c * sx_c
        blurred = _blur_tile(xb, sx_h, sx_w, xb, 0, 0, TAPS, y0, x0, H, W,
                             KS, ROWS, HALO, BW, BORDER, False, False, CDT)
        xc = tl.load((xb + ys * sx_h)[:, None] + (xs * sx_w)[None, :], mask=inside, other=0.0).to(CDT)
        eb = EPS + b * se_b + c * se_c
        e = tl.load((eb + ys * se_h)[:, None] + (xs * se_w)[None, :], mask=inside, other=0.0).to(CDT)
        res = sa * (m * blurred + (1.0 - m) * xc) + sb * e
        tl.store(out_row + c * H * W, res, mask=inside)


@triton.jit
def _degrade_bwd_kernel(
    G, MASK, AC, TS, TAPS, DX0, DEPS,
    C, H, W,
    sg_b, sg_c, sg_h, sg_w,  # grad strides; DX0 / DEPS are contiguous (B, C, H, W)
    s_ac,
    KS: tl.constexpr, ROWS: tl.constexpr, HALO: tl.constexpr, BW: tl.constexpr, BORDER: tl.constexpr,
    CPP: tl.constexpr, NEED_X0: tl.constexpr, NEED_EPS: tl.constexpr, CDT: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    y0, x0, ys, xs = _tile_coords(W, ROWS, BW)
    inside = (ys < H)[:, None] & (xs < W)[None, :]
    sa, sb = _noise_scales(AC, TS, s_ac, b, CDT)
    mplane = MASK + b * H * W
    if NEED_X0:
        mc = tl.load((mplane + ys * W)[:, None] + xs[None, :], mask=inside, other=0).to(CDT)
    dst_row = (b * C * H * W + ys * W)[:, None] + xs[None, :]
    c_lo = tl.program_id(2) * CPP
    for c in range(c_lo, tl.minimum(c_lo + CPP, C)):
        gb = G + b * sg_b + c * sg_c
        gc = tl.load((gb + ys * sg_h)[:, None] + (xs * sg_w)[None, :], mask=inside, other=0.0).to(CDT)
        if NEED_X0:
            # adjoint of the masked blur applied to g: blur^T(m * g), m read with g's halo
            adj = _blur_tile(gb, sg_h, sg_w, mplane, W, 1, TAPS, y0, x0, H, W,
                             KS, ROWS, HALO, BW, BORDER, True, True, CDT)
            tl.store(DX0 + dst_row + c * H * W, sa * (adj + (1.0 - mc) * gc), mask=inside)
        if NEED_EPS:
            tl.store(DEPS + dst_row + c * H * W, sb * gc, mask=inside)


# ----------------------------------------------------------------------------- launchers


def _fp32_ratio(src: int, dst: int) -> float:
    """float32(src) / float32(dst) rounded like C++ float division (torch's nearest scale)."""
    return float(np.float32(src) / np.float32(dst))


def _channels_per_program(channels: int, programs: int, device) -> int:
    """All channels in one program (mask work once per pixel), unless that leaves a GPU with too
    few programs to hide latency (SD 1.5 at small batch): then one program per channel."""
    if torch.device(device).type != "cuda":
        return channels  # the interpreter pays per program
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return channels if programs >= 2 * sms else 1


def _probs_blocks(n: int, nq: int, rows: int, height: int, map_h: int, map_w: int, mean: bool,
                  interp: bool) -> tuple[int, int]:
    """(TOKS, BQ) for the in-kernel mass reduction over probabilities."""
    if mean:
        toks = triton.next_power_of_2(n)
    else:  # distinct source rows among `rows` consecutive pixel rows <= rows * h // H + 2
        token_rows = min(map_h, rows * map_h // height + 2)
        toks = triton.next_power_of_2(token_rows * map_w)
    budget = (1 << 15) if interp else (1 << 12)  # elements per (query block x token) load
    bq = max(1, min(triton.next_power_of_2(nq), budget // toks))
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
    ROWS, HALO, BW, BORDER = tile_sizes(H, W, kernel_size, dev, rows, block_w)
    tiles = triton.cdiv(H, ROWS) * triton.cdiv(W, BW)
    CPP = _channels_per_program(C, tiles * B, dev)
    mean = isinstance(threshold, str)
    if heads is not None:  # probabilities (B, heads, Nq, N), any strides
        if saliency.dim() == 3:  # (B*heads, Nq, N), head_to_batch_dim layout: splitting dim 0 is a view
            saliency = saliency.unflatten(0, (B, heads))
        probs = saliency
        nq, n = probs.shape[-2:]
        TOKS, BQ = _probs_blocks(n, nq, ROWS, H, MH, MW, mean, interp)
        sal_strides = probs.stride()
    else:  # mass (B, N)
        n, nq = saliency.shape[1], 1
        TOKS, BQ = min(triton.next_power_of_2(n), 1024), 1
        sal_strides = (saliency.stride(0), 0, 0, saliency.stride(1))
    if out.numel() == 0:
        return out, (mask if write_mask else None)
    taps = gaussian_taps(kernel_size, sigma, dev, cdt)
    grid = (tiles, B, triton.cdiv(C, CPP))
    _degrade_fwd_kernel[grid](
        x0, eps, saliency, alphas_cumprod, timesteps, taps, out, mask,
        C, H, W, MH, MW, n, nq, heads or 1,
        *x0.stride(), *eps.stride(), *sal_strides,
        alphas_cumprod.stride(0), 0.0 if mean else float(threshold), _fp32_ratio(MH, H), _fp32_ratio(MW, W),
        KS=kernel_size, ROWS=ROWS, HALO=HALO, BW=BW, BORDER=BORDER, CPP=CPP, TOKS=TOKS, BQ=BQ,
        IS_PROBS=heads is not None, MEAN_THR=mean, WRITE_MASK=write_mask, CDT=_TL_DTYPE[cdt],
        num_warps=4, num_stages=1,
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
    ROWS, HALO, BW, BORDER = tile_sizes(H, W, kernel_size, dev, rows, block_w)
    taps = gaussian_taps(kernel_size, sigma, dev, cdt)
    tiles = triton.cdiv(H, ROWS) * triton.cdiv(W, BW)
    CPP = _channels_per_program(C, tiles * B, dev)
    grid = (tiles, B, triton.cdiv(C, CPP))
    dummy = grad
    _degrade_bwd_kernel[grid](
        grad, mask if need_x0 else dummy, alphas_cumprod, timesteps, taps,
        dx0 if need_x0 else dummy, deps if need_eps else dummy,
        C, H, W, *grad.stride(), alphas_cumprod.stride(0),
        KS=kernel_size, ROWS=ROWS, HALO=HALO, BW=BW, BORDER=BORDER, CPP=CPP, NEED_X0=need_x0, NEED_EPS=need_eps,
        CDT=_TL_DTYPE[cdt], num_warps=4, num_stages=1,
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
    return DegradeLatentsFunction.apply(x0, eps, saliency, heads, tuple(map_size), alphas_cumprod,
                                        timesteps, threshold, int(kernel_size), float(sigma), rows, block_w)
