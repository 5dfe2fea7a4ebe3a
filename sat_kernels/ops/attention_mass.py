"""Attention mass (attention each key receives) and row log-sum-exp, in Triton.

Three statistics for thresholding (no autograd: results are detached, in the compute dtype of
``reference.compute_dtype``: float64 for float64 inputs, else float32):

* ``attention_mass(probs4d, heads)``: mean over heads of the column sums of materialized
  probabilities (B, heads, Nq, Nk), any strides.
* ``attention_lse(q, k, scale)``: natural-log row log-sum-exp of ``scale * q @ k^T``, computed
  online (flash-style running max + rescaled sum) over key tiles.
* ``attention_mass_from_qk(q, k, lse, scale)``: the same mass without the Nq x Nk map,
  ``mass[b, j] = mean_h sum_i exp(scale * q[b,h,i] . k[b,h,j] - lse[b,h,i])``; each program owns
  a key tile and recomputes BLOCK_Q x BLOCK_K score tiles with ``tl.dot``, reusing lse.

Each is a ``torch.library`` op (torch.ops.sat_kernels.attention_mass / attention_lse /
attention_mass_from_qk) with a fake implementation: one node in a compiled graph.

No atomics: grid (B, key tiles, SPLIT); a program owns one (batch, key tile) output slice and
loops over heads and query tiles. Under the interpreter SPLIT = 1 and the program writes the
mass directly (one launch). On GPU, B * Nk / BLOCK_K programs cannot fill the SMs (64 at the
64x64 layer), so the head x query loop of each key tile is split over SPLIT = SPLIT_H * SPLIT_Q
programs writing disjoint rows of a (SPLIT, B, Nk) buffer, summed afterwards (deterministic,
one extra small reduction). Exponentials use exp2 with log2(e) folded into the scale.

Each kernel computes in the element type of its output (``OUT`` / ``LSE``), which the launcher
allocates in the compute dtype: fp32 code as before for fp32/fp16/bf16, fp64 throughout (tiles,
``tl.dot``, exp2, sums) for float64. On GPU Triton passes a Python float argument as fp32, too
coarse for fp64, so a float64 launch passes none that matters: ``kernel_q_and_scale`` folds
scale * log2(e) into q on the host (scale_log2 = 1.0) and the launcher divides the head sum by H
itself (inv_heads = 1.0). Literals in the kernels take the computation's dtype, so they stay exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .utils import LOG2E, attention_tile_config, block_d, cdiv, custom_op, dot_in_f32, interpreting

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _split_range(split, n_split, total):
    """[lo, hi) of split `split` when `total` items are cut into n_split near-equal chunks."""
    return split * total // n_split, (split + 1) * total // n_split


@triton.jit
def _store_head_mean(acc, OUT, split, b, NK, offs_k, mask_k, inv_heads, ACC_2D: tl.constexpr):
    """Row (split, b) of OUT: this program's key-tile column sums (acc, reduced over its query rows
    first when ACC_2D) times 1 / heads."""
    if ACC_2D:
        col = tl.sum(acc, axis=0)
    else:
        col = acc
    out = OUT + (split * tl.num_programs(0) + b).to(tl.int64) * NK
    tl.store(out + offs_k, col * inv_heads, mask=mask_k)


@triton.jit
def _attention_mass_probs_kernel(
    PROBS, OUT,  # PROBS: (B, H, Nq, Nk) any strides; OUT: (SPLIT_H * SPLIT_Q, B, Nk) contiguous, compute dtype
    H, NQ, NK,
    s_pb, s_ph, s_pq, s_pk,
    inv_heads,
    SPLIT_H: tl.constexpr, SPLIT_Q: tl.constexpr, ACC_2D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    kb = tl.program_id(1)
    split = tl.program_id(2)  # = split_h * SPLIT_Q + split_q: which heads / query tiles to sum
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < NK
    h_lo, h_hi = _split_range(split // SPLIT_Q, SPLIT_H, H)
    t_lo, t_hi = _split_range(split % SPLIT_Q, SPLIT_Q, tl.cdiv(NQ, BLOCK_Q))
    base = PROBS + b.to(tl.int64) * s_pb
    ct = OUT.dtype.element_ty  # the compute dtype
    if ACC_2D:  # elementwise adds in the loop, one column reduction at the end
        acc = tl.zeros([BLOCK_Q, BLOCK_K], dtype=ct)
    else:
        acc = tl.zeros([BLOCK_K], dtype=ct)
    for h in range(h_lo, h_hi):
        for t in range(t_lo, t_hi):
            offs_q = t * BLOCK_Q + tl.arange(0, BLOCK_Q)
            ptrs = base + h * s_ph + offs_q[:, None] * s_pq + offs_k[None, :] * s_pk
            tile = tl.load(ptrs, mask=(offs_q[:, None] < NQ) & mask_k[None, :], other=0.0).to(ct)
            if ACC_2D:
                acc += tile
            else:
                acc += tl.sum(tile, axis=0)  # column sums of this query tile
    _store_head_mean(acc, OUT, split, b, NK, offs_k, mask_k, inv_heads, ACC_2D)


@triton.jit
def _attention_lse_kernel(
    Q, K, LSE,  # Q: (B, H, Nq, D), K: (B, H, Nk, D) any strides; LSE: (B*H, Nq) contiguous, compute dtype
    H, NQ, NK, D,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    scale_log2,  # scale * log2(e): scores are kept in base 2
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)  # flattened (batch, head)
    qb = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D = next_power_of_2(D): pad the head dim with a mask
    mask_q = offs_q < NQ
    mask_d = offs_d < D
    q_ptrs = Q + b.to(tl.int64) * s_qb + h * s_qh + offs_q[:, None] * s_qn + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=mask_q[:, None] & mask_d[None, :], other=0.0)
    ct = LSE.dtype.element_ty  # the compute dtype
    if DOT_F32:
        q = q.to(ct)
    k_base = K + b.to(tl.int64) * s_kb + h * s_kh
    m = tl.full([BLOCK_Q], float("-inf"), dtype=ct)  # running row max (base-2 scores)
    l = tl.zeros([BLOCK_Q], dtype=ct)  # running sum of exp2(score - m)
    for start in range(0, NK, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < NK
        # load K^T directly as a (BLOCK_D, BLOCK_K) tile
        kt = tl.load(k_base + offs_k[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=mask_d[:, None] & mask_k[None, :], other=0.0)
        if DOT_F32:
            s = tl.dot(q, kt.to(ct), input_precision=PRECISION)
        else:
            s = tl.dot(q, kt)
        s = tl.where(mask_k[None, :], s * scale_log2, float("-inf"))  # padded keys contribute 0
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m = m_new
    lse = (m + tl.log2(l)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_q, lse, mask=mask_q)


@triton.jit
def _attention_mass_qk_kernel(
    Q, K, LSE, OUT,  # Q (B,H,Nq,D), K (B,H,Nk,D), LSE (B,H,Nq) any strides; OUT (SPLIT_H*SPLIT_Q, B, Nk) compute dtype
    H, NQ, NK, D,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_lb, s_lh, s_ln,
    scale_log2, inv_heads,
    SPLIT_H: tl.constexpr, SPLIT_Q: tl.constexpr, ACC_2D: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    kb = tl.program_id(1)
    split = tl.program_id(2)  # = split_h * SPLIT_Q + split_q: which heads / query tiles to sum
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < NK
    mask_d = offs_d < D
    h_lo, h_hi = _split_range(split // SPLIT_Q, SPLIT_H, H)
    t_lo, t_hi = _split_range(split % SPLIT_Q, SPLIT_Q, tl.cdiv(NQ, BLOCK_Q))
    q_base = Q + b.to(tl.int64) * s_qb
    k_base = K + b.to(tl.int64) * s_kb
    l_base = LSE + b.to(tl.int64) * s_lb
    ct = OUT.dtype.element_ty  # the compute dtype
    if ACC_2D:  # elementwise adds in the loop, one column reduction at the end
        acc = tl.zeros([BLOCK_Q, BLOCK_K], dtype=ct)
    else:
        acc = tl.zeros([BLOCK_K], dtype=ct)
    for h in range(h_lo, h_hi):
        # this program's K^T tile (BLOCK_D, BLOCK_K) of head h, loaded once per head
        kt = tl.load(k_base + h * s_kh + offs_k[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=mask_d[:, None] & mask_k[None, :], other=0.0)
        if DOT_F32:
            kt = kt.to(ct)
        for t in range(t_lo, t_hi):
            offs_q = t * BLOCK_Q + tl.arange(0, BLOCK_Q)
            mask_q = offs_q < NQ
            q = tl.load(q_base + h * s_qh + offs_q[:, None] * s_qn + offs_d[None, :] * s_qd,
                        mask=mask_q[:, None] & mask_d[None, :], other=0.0)
            # padded query rows get lse = +inf so exp2(s - inf) = 0; padded keys are never stored
            lse = tl.load(l_base + h * s_lh + offs_q * s_ln, mask=mask_q, other=float("inf"))
            if DOT_F32:
                s = tl.dot(q.to(ct), kt, input_precision=PRECISION)
            else:
                s = tl.dot(q, kt)
            p = tl.exp2(s * scale_log2 - (lse.to(ct) * 1.4426950408889634)[:, None])
            if ACC_2D:
                acc += p
            else:
                acc += tl.sum(p, axis=0)  # column sums over this query tile
    _store_head_mean(acc, OUT, split, b, NK, offs_k, mask_k, inv_heads, ACC_2D)


# ----------------------------------------------------------------------------- launchers


def dot_precision(interpret: bool, dtype: torch.dtype = torch.float32) -> str:
    """tl.dot precision for upcast tiles of compute dtype ``dtype``: exact products when
    interpreting and for fp64; for fp32 on GPU "tf32x3" (three TF32 MMAs, error ~2^-22 like fp32,
    several times faster than "ieee", which Triton runs on CUDA cores: benchmarks/RESULTS.md).
    Never plain TF32 (~1e-3)."""
    return "ieee" if interpret or dtype == torch.float64 else "tf32x3"


def kernel_q_and_scale(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """(q, scale_log2) as the q.k^T kernels take them: base-2 scores are (q . k) * scale_log2.

    For fp32 compute, q as given and scale * log2(e). For float64 (q or k float64), q * (scale *
    log2(e)) in float64 and 1.0: on GPU Triton passes a Python float argument as fp32 (the
    interpreter keeps float64), which would round the scale to ~6e-8 relative; 1.0 is exact.
    """
    scale_log2 = float(scale) * LOG2E
    if reference.compute_dtype(q, k) == torch.float64:
        return q.to(torch.float64) * scale_log2, 1.0
    return q, scale_log2


def head_mean_factor(heads: int, dtype: torch.dtype) -> float:
    """The kernels' inv_heads: 1 / heads for fp32; 1.0 for fp64, whose launcher divides the head sum
    by ``heads`` itself (an fp32 argument would round 1 / heads, see kernel_q_and_scale)."""
    return 1.0 if dtype == torch.float64 else 1.0 / heads


def finish_head_mean(out: torch.Tensor, heads: int) -> torch.Tensor:
    """The kernels' (SPLIT, B, N) head sums times head_mean_factor as the (B, N) head mean."""
    out = out[0] if out.shape[0] == 1 else out.sum(0)
    return out / heads if out.dtype == torch.float64 else out


def split_grid(programs: int, heads: int, q_tiles: int, num_sms: int | None) -> tuple[int, int]:
    """(SPLIT_H, SPLIT_Q): how many programs share one (batch, key tile)'s head x query loop.

    One under the interpreter (``num_sms`` None). On GPU enough for ~4 waves of programs over the
    SMs: heads first, in equal shares (a divisor of H: unequal shares ran slower on an H100,
    benchmarks/RESULTS.md), then query tiles. E.g. B=2, N=4096, BLOCK_K=128 on 132 SMs: 64
    tiles -> (8, 2) for H=8.
    """
    if num_sms is None:
        return 1, 1
    want = cdiv(4 * num_sms, max(1, programs))
    split_h = next((d for d in range(1, heads + 1) if heads % d == 0 and d >= want), heads)
    split_q = max(1, min(cdiv(want, split_h), q_tiles))
    return split_h, split_q


def _num_sms(t: torch.Tensor) -> int | None:
    """The SMs the split grid has to fill; None under the interpreter (no split)."""
    return None if interpreting(t) else torch.cuda.get_device_properties(t.device).multi_processor_count


def probs_mass_config(interpret: bool) -> tuple[int, int, int, bool]:
    """(BLOCK_Q, BLOCK_K, num_warps, ACC_2D) of the mass from probabilities: on GPU wide key tiles
    summed elementwise, one column reduction at the end."""
    return (32, 32, 4, False) if interpret else (32, 128, 4, True)


def lse_config(head_dim: int, dot_f32: bool, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_K, num_warps, num_stages) of attention_lse; the tiles that ran fastest on an
    H100 (benchmarks/RESULTS.md): fp32 "tf32x3" tiles unpipelined, half tiles pipelined."""
    if dot_f32:
        return attention_tile_config(block_d(head_dim), 64, 64, 4, 1, dot_f32=True, interpret=interpret)
    return attention_tile_config(block_d(head_dim), 128, 64, 4, dot_f32=False, interpret=interpret)


def qk_mass_config(head_dim: int, dot_f32: bool, interpret: bool) -> tuple[int, int, int, int, bool, str]:
    """(BLOCK_Q, BLOCK_K, num_warps, num_stages, ACC_2D, fp32 dot precision) of the mass from q, k;
    the configurations that ran fastest on an H100 (benchmarks/RESULTS.md): half inputs in
    128x128 tiles with per-tile column sums, fp32 in 64x128 "tf32x3" tiles accumulated
    elementwise (ACC_2D), one stage."""
    if dot_f32:
        tiles = attention_tile_config(block_d(head_dim), 64, 128, 4, 1, dot_f32=True, interpret=interpret)
        return (*tiles, True, dot_precision(interpret))
    tiles = attention_tile_config(block_d(head_dim), 128, 128, 4, dot_f32=False, interpret=interpret)
    return (*tiles, False, dot_precision(interpret))


def launch_attention_mass(probs4d: torch.Tensor, heads: int, split=None, config=None) -> torch.Tensor:
    """(B, Nk) in the compute dtype: mean over heads of the sum over queries of probs4d (B, heads, Nq, Nk)."""
    if probs4d.numel() == 0:
        return reference.attention_mass(probs4d, heads)
    b, h, nq, nk = probs4d.shape
    block_q, block_k, warps, acc_2d = config or probs_mass_config(interpreting(probs4d))
    k_tiles = cdiv(nk, block_k)
    split_h, split_q = split or split_grid(b * k_tiles, h, cdiv(nq, block_q), _num_sms(probs4d))
    dtype = reference.compute_dtype(probs4d)
    out = torch.empty((split_h * split_q, b, nk), dtype=dtype, device=probs4d.device)
    _attention_mass_probs_kernel[(b, k_tiles, split_h * split_q)](
        probs4d, out, h, nq, nk, *probs4d.stride(), head_mean_factor(heads, dtype),
        SPLIT_H=split_h, SPLIT_Q=split_q, ACC_2D=acc_2d, BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=warps,
    )
    return finish_head_mean(out, heads)


def launch_attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, Nq) natural-log row log-sum-exp of scale * q @ k^T, online over key tiles, in the
    compute dtype."""
    if q.numel() == 0 or k.numel() == 0:
        return reference.attention_lse(q, k, scale)
    return _launch_lse(*kernel_q_and_scale(q, k, scale), k)


def _launch_lse(q: torch.Tensor, scale_log2: float, k: torch.Tensor) -> torch.Tensor:
    """attention_lse's launch on kernel_q_and_scale's (q, scale_log2)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dtype = reference.compute_dtype(q, k)
    dot_f32, interpret = dot_in_f32(q, k), interpreting(q)
    block_q, block_k, warps, stages = lse_config(d, dot_f32, interpret)
    lse = torch.empty((b, h, nq), dtype=dtype, device=q.device)
    _attention_lse_kernel[(b * h, cdiv(nq, block_q))](
        q, k, lse, h, nq, nk, d, *q.stride(), *k.stride(), scale_log2,
        DOT_F32=dot_f32, PRECISION=dot_precision(interpret, dtype), BLOCK_Q=block_q, BLOCK_K=block_k,
        BLOCK_D=block_d(d), num_warps=warps, num_stages=stages,
    )
    return lse


def launch_attention_mass_from_qk(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, scale: float,
                                  split=None, config=None) -> torch.Tensor:
    """(B, Nk) mass[b, j] = mean_h sum_i exp(scale q[b,h,i].k[b,h,j] - lse[b,h,i]), in the compute
    dtype (a given lse is read in it).

    One launch with lse given, two (attention_lse first) with lse None; plus a (SPLIT, B, Nk)
    sum when the grid is split on GPU.
    """
    if q.numel() == 0 or k.numel() == 0:
        return reference.attention_mass_from_qk(q, k, lse, scale)
    q, scale_log2 = kernel_q_and_scale(q, k, scale)
    lse = _launch_lse(q, scale_log2, k) if lse is None else lse
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dtype = reference.compute_dtype(q, k)
    dot_f32 = dot_in_f32(q, k)
    block_q, block_k, warps, stages, acc_2d, precision = config or qk_mass_config(d, dot_f32, interpreting(q))
    if dtype == torch.float64:
        precision = dot_precision(interpreting(q), dtype)
    k_tiles = cdiv(nk, block_k)
    split_h, split_q = split or split_grid(b * k_tiles, h, cdiv(nq, block_q), _num_sms(q))
    out = torch.empty((split_h * split_q, b, nk), dtype=dtype, device=q.device)
    _attention_mass_qk_kernel[(b, k_tiles, split_h * split_q)](
        q, k, lse, out, h, nq, nk, d,
        *q.stride(), *k.stride(), *lse.stride(), scale_log2, head_mean_factor(h, dtype),
        SPLIT_H=split_h, SPLIT_Q=split_q, ACC_2D=acc_2d, DOT_F32=dot_f32, PRECISION=precision,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d(d), num_warps=warps, num_stages=stages,
    )
    return finish_head_mean(out, h)


# ----------------------------------------------------------------------------- ops (statistics: no autograd)


@custom_op("attention_mass")
def attention_mass_op(probs4d: torch.Tensor, heads: int) -> torch.Tensor:
    return launch_attention_mass(probs4d, heads)


@custom_op("attention_lse")
def attention_lse_op(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return launch_attention_lse(q, k, scale)


@custom_op("attention_mass_from_qk")
def attention_mass_from_qk_op(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None,
                              scale: float) -> torch.Tensor:
    return launch_attention_mass_from_qk(q, k, lse, scale)


@attention_mass_op.register_fake
def _(probs4d, heads):
    return probs4d.new_empty((probs4d.shape[0], probs4d.shape[3]), dtype=reference.compute_dtype(probs4d))


@attention_lse_op.register_fake
def _(q, k, scale):
    return q.new_empty(q.shape[:3], dtype=reference.compute_dtype(q, k))


@attention_mass_from_qk_op.register_fake
def _(q, k, lse, scale):
    return q.new_empty((q.shape[0], k.shape[2]), dtype=reference.compute_dtype(q, k))


def attention_mass(probs4d: torch.Tensor, heads: int, *, split=None, config=None) -> torch.Tensor:
    """(B, Nk) in the compute dtype (detached): mean over heads of the sum over queries of probs4d
    (B, heads, Nq, Nk).

    ``split`` (SPLIT_H, SPLIT_Q) / ``config`` (probs_mass_config's tuple) override the launch
    (tests use them to run the GPU's split grid under the interpreter; the op takes the default).
    """
    if split is None and config is None:
        return attention_mass_op(probs4d.detach(), heads)
    return launch_attention_mass(probs4d.detach(), heads, split, config)


def attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, Nq) in the compute dtype (detached): natural-log row log-sum-exp of scale * q @ k^T."""
    return attention_lse_op(q.detach(), k.detach(), float(scale))


def attention_mass_from_qk(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, scale: float, *,
                           split=None, config=None) -> torch.Tensor:
    """(B, Nk) in the compute dtype (detached): attention mass from q, k and lse (None: computed first).
    ``split`` / ``config`` (qk_mass_config's tuple) override the launch, as in attention_mass."""
    q, k, lse = q.detach(), k.detach(), None if lse is None else lse.detach()
    if split is None and config is None:
        return attention_mass_from_qk_op(q, k, lse, float(scale))
    return launch_attention_mass_from_qk(q, k, lse, scale, split, config)
