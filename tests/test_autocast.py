"""The attention statistics ignore a caller's autocast: results equal the full-precision math.

The trainer captures q/k inside the UNet forward, which runs under ``torch.autocast`` with
``--mixed_precision bf16``; there autocast would turn the score products q @ k^T into bf16 GEMMs
and round every score before the exponential. Oracle: the materialized softmax of
scale * q @ k^T, computed here with autocast off in float64 from the same inputs upcast, reduced
with plain torch ops; every backend must match it to 1e-5 (relative to the largest value), the
tolerance of the autocast-free tests.
"""

import pytest
import torch

import sat_kernels

INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
RTOL = 1e-5


def make_qk(b, h, nq, nk, d, dtype, seed=0):
    """q, k in the attention processors' (B, N, H, D).transpose(1, 2) layout; scores of a few units."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, h, d, generator=g).mul(2).to(dtype).transpose(1, 2)
    k = torch.randn(b, nk, h, d, generator=g).to(dtype).transpose(1, 2)
    return q, k


def softmax64(q, k, scale):
    """(B, H, Nq, Nk) attention map in float64, autocast off."""
    with torch.autocast("cpu", enabled=False):
        return torch.softmax(scale * q.double() @ k.double().transpose(-1, -2), dim=-1)


def lse32(q, k, scale):
    """The exact row log-sum-exp (B, H, Nq) a caller hands in, as float32."""
    with torch.autocast("cpu", enabled=False):
        return torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), dim=-1).float()


def picked_tokens(probs, tokens):
    """(B, Nq, S) head-mean probability of key tokens (B, S); -1 gives 0."""
    mean = probs.mean(dim=1)
    picked = torch.stack([mean[i][:, tokens[i].clamp(min=0)] for i in range(len(tokens))])
    return picked * (tokens >= 0)[:, None, :]


def assert_rel(actual, expected, rtol=RTOL):
    assert actual.dtype == torch.float32, f"result is {actual.dtype}, the API promises float32"
    assert actual.shape == expected.shape
    err = ((actual.double() - expected).abs().max() / expected.abs().max()).item()
    assert err <= rtol, f"max relative error {err:.2e} > {rtol:.0e}"


def make_tokens(b, nk, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, nk, (b, s), generator=g)
    tokens[0, -1] = -1  # padding
    return tokens


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("given_lse", [False, True], ids=["lse=None", "lse-given"])
def test_torch_mass_from_qk_ignores_autocast(given_lse, dtype, autocast_dtype):
    q, k = make_qk(2, 2, 64, 48, 40, dtype)
    scale = 40**-0.5
    expected = softmax64(q, k, scale).sum(dim=2).mean(dim=1)
    lse = lse32(q, k, scale) if given_lse else None
    with torch.autocast("cpu", dtype=autocast_dtype):
        mass = sat_kernels.attention_mass_from_qk(q, k, lse, backend="torch")
    assert_rel(mass, expected)


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("given_lse", [False, True], ids=["lse=None", "lse-given"])
def test_torch_token_probs_ignore_autocast(given_lse, dtype, autocast_dtype):
    q, k = make_qk(2, 2, 63, 77, 40, dtype, seed=1)
    tokens = make_tokens(2, 77, 5)
    scale = 40**-0.5
    expected = picked_tokens(softmax64(q, k, scale), tokens)
    lse = lse32(q, k, scale) if given_lse else None
    with torch.autocast("cpu", dtype=autocast_dtype):
        probs = sat_kernels.token_attention_probs(q, k, tokens, lse, backend="torch")
    assert_rel(probs, expected)
    assert torch.all(probs[0, :, -1] == 0)


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_torch_attention_lse_ignores_autocast(dtype, autocast_dtype):
    """The lse the mass and token paths compute for themselves when none is given."""
    from sat_kernels import reference

    q, k = make_qk(1, 3, 40, 56, 24, dtype, seed=2)
    scale = 0.3
    with torch.autocast("cpu", enabled=False):
        expected = torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), dim=-1)
    with torch.autocast("cpu", dtype=autocast_dtype):
        lse = reference.attention_lse(q, k, scale)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_mass_from_probs_ignores_autocast(dtype, backend):
    b, heads, nq, nk = 2, 3, 63, 40
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(3 * torch.randn(b, heads, nq, nk, generator=g), dim=-1).to(dtype)
    expected = probs.double().sum(dim=2).mean(dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mass = sat_kernels.attention_mass(probs.reshape(b * heads, nq, nk), heads, backend=backend)
    assert_rel(mass, expected)


# Triton under the interpreter: small shapes (each program instance costs ~10 ms). The kernels
# themselves never see autocast; this checks nothing in their launchers runs a torch op it rounds.
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("given_lse", [False, True], ids=["lse=None", "lse-given"])
def test_triton_mass_and_token_probs_ignore_autocast(given_lse, dtype):
    q, k = make_qk(1, 2, 33, 40, 24, dtype, seed=4)
    tokens = make_tokens(1, 40, 3, seed=4)
    scale = 24**-0.5
    probs64 = softmax64(q, k, scale)
    lse = lse32(q, k, scale) if given_lse else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mass = sat_kernels.attention_mass_from_qk(q, k, lse, backend="triton")
        token_probs = sat_kernels.token_attention_probs(q, k, tokens, lse, backend="triton")
    assert_rel(mass, probs64.sum(dim=2).mean(dim=1))
    assert_rel(token_probs, picked_tokens(probs64, tokens))
