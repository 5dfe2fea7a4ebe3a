"""Head-mean softmax probability of every query for a few selected key tokens, in Triton.

``token_attention_probs(q, k, tokens, lse, scale)`` -> (B, Nq, S) in the compute dtype (float64 when
q or k is float64, else float32; see ``attention_mass.py`` for how an fp64 launch passes its scalars):
``out[b, i, s] = mean_h exp(scale * q[b,h,i] . k[b,h,tokens[b,s]] - lse[b,h,i])``, 0 where
``tokens[b, s] == -1`` (padding). Used for cross-attention control (CAC): S is a handful of
caption tokens, so the S selected key rows are gathered into one padded tile per head.

Grid: (B, query tiles); each program loops over heads, recomputes a BLOCK_Q x BLOCK_S score tile
with ``tl.dot`` and accumulates the head mean in the compute dtype (``OUT``'s element type).
lse None -> one ``attention_lse`` launch first. Statistics only: no autograd, results are detached. A ``torch.library`` op
(torch.ops.sat_kernels.token_attention_probs) with a fake implementation: one node in a compiled graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .attention_mass import head_mean_factor, kernel_q_and_scale, launch_attention_lse
from .utils import attention_tile_config, block_d, cdiv, custom_op, dot_in_f32, interpreting, next_pow2


@triton.jit
def _token_probs_kernel(
    Q, K, LSE, TOKENS, OUT,  # Q (B,H,Nq,D), K (B,H,Nk,D), LSE (B,H,Nq), TOKENS (B,S) any strides; OUT (B,Nq,S)
    H, NQ, D, S,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_lb, s_lh, s_ln,
    s_tb, s_ts,
    scale_log2, inv_heads,
    DOT_F32: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_s = tl.arange(0, BLOCK_S)  # BLOCK_S = next_power_of_2(S) (>= 16 for tl.dot), masked past S
    offs_d = tl.arange(0, BLOCK_D)
    mask_q = offs_q < NQ
    mask_d = offs_d < D
    # selected key indices of this sample; -1 (padding) and s >= S are invalid -> never loaded, output 0
    token = tl.load(TOKENS + b.to(tl.int64) * s_tb + offs_s * s_ts, mask=offs_s < S, other=-1)
    valid = token >= 0
    row = tl.where(valid, token, 0).to(tl.int64)
    q_base = Q + b.to(tl.int64) * s_qb
    k_base = K + b.to(tl.int64) * s_kb
    l_base = LSE + b.to(tl.int64) * s_lb
    ct = OUT.dtype.element_ty  # the compute dtype
    acc = tl.zeros([BLOCK_Q, BLOCK_S], dtype=ct)
    for h in range(0, H):
        q = tl.load(q_base + h * s_qh + offs_q[:, None] * s_qn + offs_d[None, :] * s_qd,
                    mask=mask_q[:, None] & mask_d[None, :], other=0.0)
        # gathered K^T tile (BLOCK_D, BLOCK_S): column s is key row tokens[b, s] of head h
        kt = tl.load(k_base + h * s_kh + row[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=mask_d[:, None] & valid[None, :], other=0.0)
        # padded query rows: lse = +inf -> probability 0 (and never stored)
        lse = tl.load(l_base + h * s_lh + offs_q * s_ln, mask=mask_q, other=float("inf"))
        if DOT_F32:
            s = tl.dot(q.to(ct), kt.to(ct), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        acc += tl.exp2(s * scale_log2 - (lse.to(ct) * 1.4426950408889634)[:, None])
    acc = tl.where(valid[None, :], acc * inv_heads, 0.0)
    out_ptrs = OUT + (b.to(tl.int64) * NQ + offs_q[:, None]) * S + offs_s[None, :]
    tl.store(out_ptrs, acc, mask=mask_q[:, None] & (offs_s[None, :] < S))


def token_probs_config(head_dim: int, n_selected: int, dot_f32: bool, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_S, num_warps, num_stages): the S selected keys in one tile, padded to a power
    of two of at least 16 (tl.dot needs N >= 16)."""
    block_s = max(16, next_pow2(n_selected))
    block_q, _, warps, stages = attention_tile_config(block_d(head_dim), 64, block_s, 4, min_k=block_s,
                                                      dot_f32=dot_f32, interpret=interpret)
    return block_q, block_s, warps, stages


@custom_op("token_attention_probs")
def token_attention_probs_op(q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor | None,
                             scale: float) -> torch.Tensor:
    """(B, Nq, S) head-mean probability of each query for key tokens (B, S); -1 -> 0; in the
    compute dtype (a given lse is read in it).

    One launch with lse given; two (``attention_lse`` first) with lse None.
    """
    b, h, nq, d = q.shape
    s = tokens.shape[1]
    if q.numel() == 0 or k.numel() == 0 or tokens.numel() == 0:
        return reference.token_attention_probs(q, k, tokens, lse, scale)
    lse = launch_attention_lse(q, k, scale) if lse is None else lse
    q, scale_log2 = kernel_q_and_scale(q, k, scale)
    dtype = reference.compute_dtype(q, k)
    dot_f32 = dot_in_f32(q, k)
    block_q, block_s, warps, stages = token_probs_config(d, s, dot_f32, interpreting(q))
    out = torch.empty((b, nq, s), dtype=dtype, device=q.device)
    _token_probs_kernel[(b, cdiv(nq, block_q))](
        q, k, lse, tokens, out, h, nq, d, s,
        *q.stride(), *k.stride(), *lse.stride(), *tokens.stride(),
        scale_log2, head_mean_factor(h, dtype),
        DOT_F32=dot_f32, BLOCK_Q=block_q, BLOCK_S=block_s, BLOCK_D=block_d(d), num_warps=warps, num_stages=stages,
    )
    return out / h if dtype == torch.float64 else out


@token_attention_probs_op.register_fake
def _(q, k, tokens, lse, scale):
    return q.new_empty((q.shape[0], q.shape[2], tokens.shape[1]), dtype=reference.compute_dtype(q, k))


def token_attention_probs(q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor | None,
                          scale: float) -> torch.Tensor:
    """torch.ops.sat_kernels.token_attention_probs on detached inputs (statistics: no autograd)."""
    return token_attention_probs_op(q.detach(), k.detach(), tokens, None if lse is None else lse.detach(),
                                    float(scale))
