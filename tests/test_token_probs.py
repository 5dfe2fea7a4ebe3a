"""sat_kernels/ops/token_probs.py (Triton, run by the interpreter on CPU) against the materialized map.

Oracle: columns ``tokens`` of the head-mean of softmax(scale * q @ k^T), in float64 from the same
(rounded) inputs; padded tokens (-1) must give exactly 0.
"""

import pytest
import torch

import sat_kernels
from sat_kernels.ops import token_probs as ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# kernel vs float64 oracle from the same rounded inputs (seen: <= 5e-7 for every dtype)
RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# PyTorch's half flash attention returns an lse off by ~5e-5 (fp32: ~1e-6): see test_attention_mass
FLASH_RTOL = {torch.float32: 1e-5, torch.float16: 1.5e-4, torch.bfloat16: 1.5e-4}

# (B, H, Nq, Nk, D, S): cross-attention-like (77 caption tokens), odd Nq, S a power of two
SHAPES = [(2, 2, 64, 77, 40, 5), (1, 2, 63, 16, 24, 3), (2, 1, 17, 40, 40, 16)]


def make_inputs(shape, dtype, layout, seed=0):
    b, h, nq, nk, d, s = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # attention processors: (B, N, H, D) viewed as (B, H, N, D)
        q = torch.randn(b, nq, h, d, generator=g).mul(2).to(dtype).transpose(1, 2)
        k = torch.randn(b, nk, h, d, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(b, h, nq, d, generator=g).mul(2).to(dtype)
        k = torch.randn(b, h, nk, d, generator=g).to(dtype)
    tokens = torch.randint(0, nk, (b, s), generator=g)
    tokens[0, 0], tokens[-1, -1] = 0, nk - 1  # both ends of the key range
    tokens[0, -1] = -1  # padding
    if s > 2:
        tokens[-1, 1] = tokens[-1, 0]  # a repeated token
    return q, k, tokens


def oracle(q, k, tokens, scale):
    probs = torch.softmax(scale * q.double() @ k.double().transpose(-1, -2), dim=-1).mean(dim=1)  # (B, Nq, Nk)
    picked = torch.stack([probs[i][:, tokens[i].clamp(min=0)] for i in range(len(tokens))])
    return picked * (tokens >= 0)[:, None, :]


def flash_lse(q, k, scale=None):
    kwargs = {} if scale is None else {"scale": scale}
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, **kwargs)[1]


def assert_rel(actual, expected, rtol):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    err = ((actual.double() - expected).abs().max() / expected.abs().max()).item()
    assert err <= rtol, f"max relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_token_probs_equal_materialized_columns(shape, dtype, layout):
    q, k, tokens = make_inputs(shape, dtype, layout)
    scale = shape[4] ** -0.5
    expected = oracle(q, k, tokens, scale)
    got_none = sat_kernels.token_attention_probs(q, k, tokens, backend="triton")
    got_lse = sat_kernels.token_attention_probs(q, k, tokens, flash_lse(q, k), backend="triton")
    assert_rel(got_none, expected, RTOL[dtype])
    assert_rel(got_lse, expected, FLASH_RTOL[dtype])
    for got in (got_none, got_lse):
        assert torch.all(got[0, :, -1] == 0)  # padded token -> exactly 0
    assert_rel(sat_kernels.token_attention_probs(q, k, tokens, backend="torch"), expected, RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_probs_explicit_scale_strided_tokens(dtype):
    shape = (2, 2, 32, 20, 40, 4)
    q, k, _ = make_inputs(shape, dtype, "transposed", seed=1)
    tokens = torch.tensor([[3, 19, -1, 0], [-1, -1, -1, 7]]).t().contiguous().t()  # non-contiguous (B, S)
    assert not tokens.is_contiguous()
    scale = 0.3
    expected = oracle(q, k, tokens, scale)
    assert_rel(ops.token_attention_probs(q, k, tokens, None, scale), expected, RTOL[dtype])
    got = sat_kernels.token_attention_probs(q, k, tokens, flash_lse(q, k, scale), scale=scale, backend="triton")
    assert_rel(got, expected, FLASH_RTOL[dtype])
    assert torch.all(got[1, :, :3] == 0) and torch.all(got[0, :, 2] == 0)


def test_token_probs_all_padding_is_zero():
    q, k, _ = make_inputs((1, 2, 16, 8, 40, 2), torch.float32, "contiguous", seed=2)
    tokens = torch.full((1, 2), -1)
    got = sat_kernels.token_attention_probs(q, k, tokens, backend="triton")
    assert got.shape == (1, 16, 2) and torch.all(got == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_inputs_are_computed_and_returned_in_float64(backend):
    """float64 q, k give float64 probabilities within 1e-12 (relative) of the float64 formula; the
    same formula in float32 misses that bound by orders of magnitude."""
    _, _, tokens = make_inputs((2, 3, 40, 24, 20, 5), torch.float32, "contiguous", seed=8)
    g = torch.Generator().manual_seed(8)  # drawn in float64: values float32 cannot hold
    q = 2 * torch.randn(2, 3, 40, 20, dtype=torch.float64, generator=g)
    k = torch.randn(2, 3, 24, 20, dtype=torch.float64, generator=g)
    scale = 0.3
    scores = scale * q @ k.transpose(-1, -2)
    lse = torch.logsumexp(scores, dim=-1)
    head_mean = torch.exp(scores - lse[..., None]).mean(dim=1)  # (B, Nq, Nk), float64
    expected = torch.stack([head_mean[i][:, tokens[i].clamp(min=0)] for i in range(2)]) * (tokens >= 0)[:, None]
    for given in (None, lse):
        got = sat_kernels.token_attention_probs(q, k, tokens, given, scale, backend=backend)
        assert got.dtype == torch.float64 and got.shape == expected.shape
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        assert err <= 1e-12, f"max relative error {err:.2e} > 1e-12"
        assert torch.all(got[0, :, -1] == 0)  # padding stays exactly 0
    in_fp32 = oracle(q.float(), k.float(), tokens, scale)  # oracle upcasts the fp32-rounded inputs
    assert ((in_fp32 - expected).abs().max() / expected.abs().max()).item() > 1e-9
