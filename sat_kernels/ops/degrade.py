"""SAT/SAG latent degradation in ONE Triton launch (forward), with its backward.

    x_deg = sqrt(ab_t) * (m * blur(x0) + (1 - m) * x0) + sqrt(1 - ab_t) * eps

m is the thresholded saliency map (mass > threshold, or > the sample's mean mass) upsampled to
(H, W) exactly like ``F.interpolate(mode="nearest")``: source index
``min(floor(dst * float32(in / out)), in - 1)``, the product taken in fp32.

Grid: (row chunks * column strips, B, channel groups). A program walks one strip of one sample
down BLOCK_ROWS rows with up to 4 channels at once (a (BLOCK_C, BLOCK_W) tile: the row walk of
``utils.py``), so the per-sample work happens once per program:
  1. what the mask needs. From a mass (B, h*w): the threshold (one sweep for "mean"). From
     probabilities (B, heads, N, N), any strides: the program reduces mass[j] = mean_heads
     sum_queries P[b, :, :, j] itself, only for the contiguous token range its rows can touch
     (all N tokens for "mean"), and thresholds it.
  2. sqrt(ab_t), sqrt(1 - ab_t) from alphas_cumprod[timesteps[b]].
  3. per row: the blurred row (the row walk's ring of row-blurred rows), the mask row (a gather
     of the mass, or of the thresholded tokens with ``tl.gather``), blend with x0, re-noise with
     eps, store.
The backward is one launch too: d_eps = sqrt(1 - ab) g and
d_x0 = sqrt(ab) (blur_adjoint(m g) + (1 - m) g), with m saved by the forward as a (B, H, W)
uint8 plane (written by the same forward launch, only when x0 needs a gradient). Forward and
backward are ``torch.library`` ops (torch.ops.sat_kernels.degrade_latents / _backward: one graph
node each under torch.compile); the backward's own backward is the forward again: gradients are
differentiable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .utils import (TL_DTYPE, blur_along_w, blur_down_h, cdiv, custom_op, fp32_ratio, gather_weights, h_weights_at,
                    int32_columns, next_pow2, no_tensor, or_none, ring_before, row_walk_tiles, strip_coords,
                    strip_invariants, threshold_args, threshold_of, token_mean)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _noise_scales(ALPHAS_CUMPROD, TIMESTEPS, s_ac, b, COMPUTE_DTYPE: tl.constexpr):
    """sqrt(ab), sqrt(1 - ab) for ab = alphas_cumprod[timesteps[b]], in the compute dtype."""
    ab = tl.load(ALPHAS_CUMPROD + tl.load(TIMESTEPS + b) * s_ac).to(COMPUTE_DTYPE)
    if COMPUTE_DTYPE == tl.float64:  # fp64 sqrt is IEEE-rounded; sqrt_rn is fp32-only
        sa = tl.sqrt(ab)
        sb = tl.sqrt(1.0 - ab)
    else:  # tl.sqrt may be approximate in fp32 on GPU
        sa = tl.sqrt_rn(ab)
        sb = tl.sqrt_rn(1.0 - ab)
    return sa, sb


@triton.jit
def _degrade_fwd_kernel(
    X0, EPS, SALIENCY, ALPHAS_CUMPROD, TIMESTEPS, W_WEIGHTS, H_WEIGHTS, OUT, MASK,  # *_WEIGHTS: see utils.py
    C, H, W, MAP_H, MAP_W, N_TOKENS, N_QUERIES, HEADS,
    sx_b, sx_c, sx_h, sx_w,
    se_b, se_c, se_h, se_w,
    ss_b, ss_h, ss_q, ss_k,  # saliency strides: (b, -, -, token) for a mass, (b, head, query, key) for probs
    s_ac, threshold, scale_h, scale_w,  # scale_*: fp32 in/out ratios of the nearest upsample
    KERNEL_SIZE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr, BLOCK_Q: tl.constexpr,
    IS_PROBS: tl.constexpr, MEAN_THRESHOLD: tl.constexpr, WRITE_MASK: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    # grid: (row chunks * column strips, B, channel groups); a (BLOCK_C, BLOCK_W) tile walks BLOCK_ROWS rows
    RADIUS: tl.constexpr = KERNEL_SIZE // 2
    b = tl.program_id(1).to(tl.int64)
    y0, n_rows, xs = strip_coords(H, W, BLOCK_ROWS, BLOCK_W)
    ch = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    ok = (ch < C)[:, None] & (xs < W)[None, :]
    # nearest source token column of each pixel, bit-exact with torch: min(int(dst * scale), in - 1)
    src_x = tl.minimum((xs.to(tl.float32) * scale_w).to(tl.int64), MAP_W - 1)
    sal = SALIENCY + b * ss_b

    # ---- 1. what the mask rows need. From probabilities (B, heads, N, N), any strides: the
    # program reduces mass[j] = mean_heads sum_queries P[b, :, :, j] itself, only for the
    # contiguous token range its rows can touch (all N tokens for "mean"), and thresholds it.
    # From a mass (B, h*w): the threshold (one sweep for "mean"); rows gather the mass.
    if IS_PROBS:
        if MEAN_THRESHOLD:
            first_token = 0
        else:
            first_token = tl.minimum((y0.to(tl.float32) * scale_h).to(tl.int64), MAP_H - 1) * MAP_W
        tokens = first_token + tl.arange(0, BLOCK_TOKENS).to(tl.int64)
        token_ok = tokens < N_TOKENS
        acc = tl.zeros((BLOCK_TOKENS,), tl.float32)
        for head in range(HEADS):
            for q0 in range(0, N_QUERIES, BLOCK_Q):
                queries = q0 + tl.arange(0, BLOCK_Q).to(tl.int64)
                ptrs = (sal + head * ss_h + queries * ss_q)[:, None] + (tokens * ss_k)[None, :]
                block = tl.load(ptrs, mask=(queries < N_QUERIES)[:, None] & token_ok[None, :], other=0.0)
                acc += tl.sum(block.to(tl.float32), axis=0)
        mass = acc / HEADS  # mean over heads of the per-head query sums
        if MEAN_THRESHOLD:
            t = tl.sum(mass) / N_TOKENS
        else:
            t = threshold
        hot = (mass > t).to(COMPUTE_DTYPE)
    else:
        if MEAN_THRESHOLD:
            t = token_mean(sal, ss_k, N_TOKENS, BLOCK_TOKENS)
        else:
            t = threshold

    # ---- 2. re-noise scales
    sa, sb = _noise_scales(ALPHAS_CUMPROD, TIMESTEPS, s_ac, b, COMPUTE_DTYPE)

    # ---- 3. walk the strip: blur row (utils.py), mask row, blend with x0, re-noise with eps, store
    x_planes = (X0 + b * sx_b + ch * sx_c)[:, None]
    e_planes = (EPS + b * se_b + ch * se_c)[:, None]
    out = OUT + ((b * C + ch) * H * W)[:, None] + xs[None, :]
    strip = strip_invariants(x_planes, ok, sx_h, sx_w, X0, 0, 0, xs, W, W_WEIGHTS, KERNEL_SIZE, False)
    ring = ring_before(strip, y0, H, KERNEL_SIZE, False, COMPUTE_DTYPE)
    taps = h_weights_at(H_WEIGHTS, 0, KERNEL_SIZE)
    for i in range(n_rows):
        y = y0 + i
        ring = ring[1:] + (blur_along_w(strip, y + RADIUS, H, KERNEL_SIZE, False, COMPUTE_DTYPE),)
        blurred = blur_down_h(ring, taps, KERNEL_SIZE)
        token = tl.minimum((y.to(tl.float32) * scale_h).to(tl.int64), MAP_H - 1) * MAP_W + src_x  # (BLOCK_W,)
        if IS_PROBS:  # spread token values to pixels: a gather along the token axis
            slot = tl.minimum(tl.maximum(token - first_token, 0), BLOCK_TOKENS - 1).to(tl.int32)
            m = tl.gather(hot, slot, 0)[None, :]
        else:
            m = (tl.load(sal + token * ss_k).to(tl.float32) > t).to(COMPUTE_DTYPE)[None, :]
        y64 = y.to(tl.int64)
        x = tl.load(x_planes + y64 * sx_h + xs[None, :] * sx_w, mask=ok, other=0.0).to(COMPUTE_DTYPE)
        e = tl.load(e_planes + y64 * se_h + xs[None, :] * se_w, mask=ok, other=0.0).to(COMPUTE_DTYPE)
        tl.store(out + y64 * W, sa * (m * blurred + (1.0 - m) * x) + sb * e, mask=ok)
        if WRITE_MASK:  # saved for the backward, by one channel group
            if tl.program_id(2) == 0:
                tl.store(MASK + (b * H + y64) * W + xs[None, :], m.to(tl.uint8), mask=(xs < W)[None, :])


@triton.jit
def _degrade_bwd_kernel(
    GRAD, MASK, ALPHAS_CUMPROD, TIMESTEPS, W_WEIGHTS, H_WEIGHTS, GRAD_X0, GRAD_EPS,  # *_WEIGHTS: the adjoint's
    C, H, W,
    sg_b, sg_c, sg_h, sg_w,  # GRAD strides; GRAD_X0 / GRAD_EPS are contiguous (B, C, H, W)
    s_ac,
    KERNEL_SIZE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    NEED_X0: tl.constexpr, NEED_EPS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    RADIUS: tl.constexpr = KERNEL_SIZE // 2
    b = tl.program_id(1).to(tl.int64)
    y0, n_rows, xs = strip_coords(H, W, BLOCK_ROWS, BLOCK_W)
    ch = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    ok = (ch < C)[:, None] & (xs < W)[None, :]
    sa, sb = _noise_scales(ALPHAS_CUMPROD, TIMESTEPS, s_ac, b, COMPUTE_DTYPE)
    g_planes = (GRAD + b * sg_b + ch * sg_c)[:, None]
    mask_plane = MASK + b * H * W
    dst = ((b * C + ch) * H * W)[:, None] + xs[None, :]
    if NEED_X0:  # the masked blur's adjoint blur^T(m * g): the walk reads m along with g
        strip = strip_invariants(g_planes, ok, sg_h, sg_w, mask_plane, W, 1, xs, W, W_WEIGHTS, KERNEL_SIZE, True)
        ring = ring_before(strip, y0, H, KERNEL_SIZE, True, COMPUTE_DTYPE)
    for i in range(n_rows):
        y = y0 + i
        y64 = y.to(tl.int64)
        g = tl.load(g_planes + y64 * sg_h + xs[None, :] * sg_w, mask=ok, other=0.0).to(COMPUTE_DTYPE)
        if NEED_X0:
            ring = ring[1:] + (blur_along_w(strip, y + RADIUS, H, KERNEL_SIZE, True, COMPUTE_DTYPE),)
            m = tl.load(mask_plane + y64 * W + xs[None, :], mask=(xs < W)[None, :], other=0).to(COMPUTE_DTYPE)
            blurred = blur_down_h(ring, h_weights_at(H_WEIGHTS, y, KERNEL_SIZE), KERNEL_SIZE)
            tl.store(GRAD_X0 + dst + y64 * W, sa * (blurred + (1.0 - m) * g), mask=ok)
        if NEED_EPS:
            tl.store(GRAD_EPS + dst + y64 * W, sb * g, mask=ok)


# ----------------------------------------------------------------------------- launchers


def mass_reduction_blocks(n_tokens: int, n_queries: int, rows: int, height: int, map_h: int, map_w: int,
                          mean: bool, interpret: bool) -> tuple[int, int]:
    """(BLOCK_TOKENS, BLOCK_Q) for the in-kernel mass reduction over probabilities."""
    if mean:
        block_tokens = next_pow2(n_tokens)
    else:  # distinct source rows among `rows` consecutive pixel rows <= rows * h // H + 2
        token_rows = min(map_h, rows * map_h // height + 2)
        block_tokens = next_pow2(token_rows * map_w)
    budget = (1 << 15) if interpret else (1 << 12)  # elements per (query block x token) load
    block_q = max(1, min(next_pow2(n_queries), budget // block_tokens))
    return block_tokens, block_q


def degrade_forward(x0, eps, saliency, heads, map_size, alphas_cumprod, timesteps, threshold,
                    kernel_size, sigma, write_mask, rows=None, block_w=None):
    """Launch the fused forward; returns (out, mask (B, H, W) uint8 or None)."""
    B, C, H, W = x0.shape
    map_h, map_w = map_size
    compute_dtype = reference.compute_dtype(x0)
    dev = x0.device
    out = torch.empty((B, C, H, W), dtype=compute_dtype, device=dev)
    mask = torch.empty((B, H, W), dtype=torch.uint8, device=dev) if write_mask else out
    block_rows, block_width, block_c, warps = row_walk_tiles(H, W, C, dev, rows, block_w)
    mean = isinstance(threshold, str)
    if heads is not None:  # probabilities (B, heads, Nq, N), any strides
        if saliency.dim() == 3:  # (B*heads, Nq, N), head_to_batch_dim layout: splitting dim 0 is a view
            saliency = saliency.unflatten(0, (B, heads))
        n_queries, n_tokens = saliency.shape[-2:]
        block_tokens, block_q = mass_reduction_blocks(n_tokens, n_queries, block_rows, H, map_h, map_w, mean,
                                                      dev.type != "cuda")
        saliency_strides = saliency.stride()
    else:  # mass (B, N)
        n_tokens, n_queries = saliency.shape[1], 1
        block_tokens, block_q = min(next_pow2(n_tokens), 1024), 1
        saliency_strides = (saliency.stride(0), 0, 0, saliency.stride(1))
    if out.numel() == 0:
        return out, (mask if write_mask else None)
    x0, eps = int32_columns(x0), int32_columns(eps)
    grid = (cdiv(H, block_rows) * cdiv(W, block_width), B, cdiv(C, block_c))
    _degrade_fwd_kernel[grid](
        x0, eps, saliency, alphas_cumprod, timesteps,
        gather_weights(W, kernel_size, sigma, False, dev, compute_dtype),
        gather_weights(H, kernel_size, sigma, False, dev, compute_dtype), out, mask,
        C, H, W, map_h, map_w, n_tokens, n_queries, heads or 1,
        *x0.stride(), *eps.stride(), *saliency_strides,
        alphas_cumprod.stride(0), 0.0 if mean else float(threshold), fp32_ratio(map_h, H), fp32_ratio(map_w, W),
        KERNEL_SIZE=kernel_size, BLOCK_ROWS=block_rows, BLOCK_W=block_width, BLOCK_C=block_c,
        BLOCK_TOKENS=block_tokens, BLOCK_Q=block_q, IS_PROBS=heads is not None, MEAN_THRESHOLD=mean,
        WRITE_MASK=write_mask, COMPUTE_DTYPE=TL_DTYPE[compute_dtype], num_warps=warps, num_stages=1,
    )
    return out, (mask if write_mask else None)


def degrade_backward(grad, mask, alphas_cumprod, timesteps, kernel_size, sigma, need_x0, need_eps,
                     x0_dtype, eps_dtype, rows=None, block_w=None):
    """One launch: (d_x0 or None, d_eps or None), in the inputs' dtypes."""
    B, C, H, W = grad.shape
    compute_dtype = reference.compute_dtype(grad)
    dev = grad.device
    grad_x0 = torch.empty((B, C, H, W), dtype=x0_dtype, device=dev) if need_x0 else None
    grad_eps = torch.empty((B, C, H, W), dtype=eps_dtype, device=dev) if need_eps else None
    if grad.numel() == 0:
        return grad_x0, grad_eps
    block_rows, block_width, block_c, warps = row_walk_tiles(H, W, C, dev, rows, block_w)
    grad = int32_columns(grad)
    grid = (cdiv(H, block_rows) * cdiv(W, block_width), B, cdiv(C, block_c))
    unused = grad  # any pointer for the outputs (and mask) a branch never touches
    _degrade_bwd_kernel[grid](
        grad, mask if need_x0 else unused, alphas_cumprod, timesteps,
        gather_weights(W, kernel_size, sigma, True, dev, compute_dtype),
        gather_weights(H, kernel_size, sigma, True, dev, compute_dtype),
        grad_x0 if need_x0 else unused, grad_eps if need_eps else unused,
        C, H, W, *grad.stride(), alphas_cumprod.stride(0),
        KERNEL_SIZE=kernel_size, BLOCK_ROWS=block_rows, BLOCK_W=block_width, BLOCK_C=block_c,
        NEED_X0=need_x0, NEED_EPS=need_eps, COMPUTE_DTYPE=TL_DTYPE[compute_dtype], num_warps=warps, num_stages=1,
    )
    return grad_x0, grad_eps


# ----------------------------------------------------------------------------- ops and autograd


@custom_op("degrade_latents")
def degrade_latents_op(x0: torch.Tensor, eps: torch.Tensor, saliency: torch.Tensor, heads: int | None, map_h: int,
                       map_w: int, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, threshold: float,
                       mean_threshold: bool, kernel_size: int, sigma: float, write_mask: bool, rows: int | None,
                       block_w: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused degrade as torch.ops.sat_kernels.degrade_latents: (x_deg, mask). The mask (B, H, W)
    uint8 is what the backward reads; it is written only with ``write_mask`` (x0 needs a gradient),
    else it is an empty tensor. Threshold: threshold_args' pair."""
    out, mask = degrade_forward(x0, eps, saliency, heads, (map_h, map_w), alphas_cumprod, timesteps,
                                threshold_of(threshold, mean_threshold), kernel_size, sigma, write_mask, rows, block_w)
    return out, mask if write_mask else no_tensor(out, torch.uint8)


@custom_op("degrade_latents_backward")
def degrade_backward_op(grad: torch.Tensor, mask: torch.Tensor, alphas_cumprod: torch.Tensor,
                        timesteps: torch.Tensor, kernel_size: int, sigma: float, need_x0: bool, need_eps: bool,
                        x0_dtype: torch.dtype, eps_dtype: torch.dtype, rows: int | None,
                        block_w: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_x0, d_eps) = J^T g, each an empty tensor when not needed (see degrade_backward)."""
    grad_x0, grad_eps = degrade_backward(grad, mask, alphas_cumprod, timesteps, kernel_size, sigma, need_x0,
                                         need_eps, x0_dtype, eps_dtype, rows, block_w)
    return (grad_x0 if need_x0 else no_tensor(grad, x0_dtype)), (grad_eps if need_eps else no_tensor(grad, eps_dtype))


@degrade_latents_op.register_fake
def _(x0, eps, saliency, heads, map_h, map_w, alphas_cumprod, timesteps, threshold, mean_threshold, kernel_size,
      sigma, write_mask, rows, block_w):
    out = x0.new_empty(x0.shape, dtype=reference.compute_dtype(x0))
    B, _, H, W = x0.shape
    return out, (x0.new_empty((B, H, W), dtype=torch.uint8) if write_mask else no_tensor(x0, torch.uint8))


@degrade_backward_op.register_fake
def _(grad, mask, alphas_cumprod, timesteps, kernel_size, sigma, need_x0, need_eps, x0_dtype, eps_dtype, rows,
      block_w):
    def gradient(needed, dtype):
        return grad.new_empty(grad.shape, dtype=dtype) if needed else no_tensor(grad, dtype)
    return gradient(need_x0, x0_dtype), gradient(need_eps, eps_dtype)


def _save_degrade(ctx, inputs, output):
    (x0, eps, _saliency, _heads, _map_h, _map_w, alphas_cumprod, timesteps, _threshold, _mean, kernel_size, sigma,
     write_mask, rows, block_w) = inputs
    ctx.save_for_backward(output[1], alphas_cumprod, timesteps)  # output[1]: the mask
    ctx.params, ctx.dtypes, ctx.tiles = (kernel_size, sigma), (x0.dtype, eps.dtype), (rows, block_w)
    ctx.mask_written = write_mask


def _degrade_backward(ctx, grad, _grad_of_mask):
    mask, alphas_cumprod, timesteps = ctx.saved_tensors
    need_x0, need_eps = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if need_x0 and not ctx.mask_written:
        raise RuntimeError("sat_kernels.degrade_latents: x0 needs a gradient but the op ran with write_mask=False")
    dx0, deps = degrade_backward_op(grad, mask, alphas_cumprod, timesteps, *ctx.params, need_x0, need_eps,
                                    *ctx.dtypes, *ctx.tiles)
    return (or_none(dx0, need_x0), or_none(deps, need_eps)) + (None,) * 13


def _save_degrade_backward(ctx, inputs, output):
    (grad, mask, alphas_cumprod, timesteps, kernel_size, sigma, need_x0, need_eps, _x0_dtype, _eps_dtype, rows,
     block_w) = inputs
    ctx.save_for_backward(mask, alphas_cumprod, timesteps)
    ctx.params, ctx.needed, ctx.tiles = (kernel_size, sigma), (need_x0, need_eps), (rows, block_w)
    ctx.grad_dtype = grad.dtype


def _degrade_double_backward(ctx, grad_of_dx0, grad_of_deps):
    """(d_x0, d_eps) = J^T g is linear in g, so its backward is J itself: the degrade forward applied
    to the gradients' gradients (u, v), sqrt(ab) (m * blur(u) + (1 - m) * u) + sqrt(1 - ab) v, with
    the saved mask as the saliency (a (B, H*W) map of 0/1 at the latents' size, threshold 0.5).
    That is the degrade op again, so any order of derivative is exact, as on the torch backend."""
    mask, alphas_cumprod, timesteps = ctx.saved_tensors
    need_x0, need_eps = ctx.needed
    if need_x0:  # d_x0 was computed, so the mask was saved
        B, _, H, W = grad_of_dx0.shape
        v = grad_of_deps if need_eps else torch.zeros_like(grad_of_dx0)
        grad_of_grad = degrade_latents(grad_of_dx0, v, mask.view(B, H * W), None, (H, W), alphas_cumprod,
                                       timesteps, 0.5, *ctx.params, rows=ctx.tiles[0], block_w=ctx.tiles[1])
    else:  # only the re-noise term: sqrt(1 - ab) v
        ab = alphas_cumprod.to(ctx.grad_dtype)[timesteps].view(-1, 1, 1, 1)
        grad_of_grad = (1 - ab).sqrt() * grad_of_deps.to(ctx.grad_dtype)
    return (grad_of_grad,) + (None,) * 11


degrade_latents_op.register_autograd(_degrade_backward, setup_context=_save_degrade)
degrade_backward_op.register_autograd(_degrade_double_backward, setup_context=_save_degrade_backward)


def degrade_latents(x0, eps, saliency, heads, map_size, alphas_cumprod, timesteps, threshold=1.0,
                    kernel_size=9, sigma=1.0, *, rows=None, block_w=None):
    """reference.degrade_latents in one launch. ``saliency``: mass (B, h*w) with heads=None, or
    probabilities (B, heads, N, N) (any strides) with ``heads``. ``rows``/``block_w`` override
    the tile (tests use them to cross tile borders)."""
    write_mask = torch.is_grad_enabled() and x0.requires_grad  # the backward's d_x0 reads it
    value, mean = threshold_args(threshold)
    return degrade_latents_op(x0, eps, saliency.detach(), heads, *map_size, alphas_cumprod, timesteps, value, mean,
                              int(kernel_size), float(sigma), write_mask, rows, block_w)[0]
