"""sat_kernels/ops/attention_mass.py (Triton, run by the interpreter on CPU) against independent oracles.

The oracle is always the materialized map: softmax(scale * q @ k^T) in float64 from the very
same (rounded) inputs, reduced with plain torch ops. lse comes from PyTorch's own flash
attention (``aten._scaled_dot_product_flash_attention_for_cpu``: (out, lse) with lse
(B, H, Nq) float32, natural log, laid out (B, Nq, H) in memory, i.e. strided) or is computed by
the kernel itself (lse=None). The kernels read fp16/bf16 exactly and upcast tiles to fp32 before
tl.dot under the interpreter, so every dtype is held to a tight tolerance.
"""

import math

import pytest
import torch

import sat_kernels
from sat_kernels import reference
from sat_kernels.ops import attention_mass as ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerances on float32 results vs a float64 oracle built from the same rounded inputs.
# The kernels read every dtype exactly and compute in fp32: 1e-5 for all (seen: <= 5e-7).
RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# With lse from PyTorch's flash attention for half inputs, that lse itself is off by ~5e-5
# (absolute, seen on torch 2.13 CPU; fp32: ~1e-6), which moves every probability by ~5e-5.
FLASH_RTOL = {torch.float32: 1e-5, torch.float16: 1.5e-4, torch.bfloat16: 1.5e-4}

# (B, H, Nq, Nk, D): square 64x64 map, odd N=63, rectangular Nq != Nk, head dim not a power of 2
SHAPES = [(2, 2, 64, 64, 40), (1, 2, 63, 63, 40), (2, 1, 48, 17, 24)]


def make_qk(shape, dtype, layout, seed=0, gain=2.0):
    """q (B,H,Nq,D), k (B,H,Nk,D); "transposed" = attention-processor layout (B,N,H,D).transpose(1,2).

    gain > 1 makes the softmax peaky (scores of a few units, like trained attention).
    """
    b, h, nq, nk, d = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        q = torch.randn(b, nq, h, d, generator=g).mul(gain).to(dtype).transpose(1, 2)
        k = torch.randn(b, nk, h, d, generator=g).to(dtype).transpose(1, 2)
        assert q.stride(2) == k.stride(2) == h * d  # token rows interleaved with the other heads
    else:
        q = torch.randn(b, h, nq, d, generator=g).mul(gain).to(dtype)
        k = torch.randn(b, h, nk, d, generator=g).to(dtype)
    return q, k


def softmax64(q, k, scale):
    """The materialized (B, H, Nq, Nk) attention map in float64."""
    return torch.softmax(scale * q.double() @ k.double().transpose(-1, -2), dim=-1)


def mass_oracle(probs):
    """mean over heads of the sum over queries, float64."""
    return probs.sum(dim=2).mean(dim=1)


def flash_lse(q, k, scale=None):
    kwargs = {} if scale is None else {"scale": scale}
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, **kwargs)[:2]
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    return lse


def assert_rel(actual, expected, rtol, dtype=torch.float32):
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    err = ((actual.double() - expected).abs().max() / expected.abs().max()).item()
    assert err <= rtol, f"max relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mass_from_qk_equals_materialized_softmax(shape, dtype, layout):
    q, k = make_qk(shape, dtype, layout)
    scale = shape[-1] ** -0.5
    expected = mass_oracle(softmax64(q, k, scale))
    lse = flash_lse(q, k)
    # lse from PyTorch's flash attention (a strided (B, Nq, H) buffer), and computed in-kernel
    assert_rel(sat_kernels.attention_mass_from_qk(q, k, lse, backend="triton"), expected, FLASH_RTOL[dtype])
    assert_rel(sat_kernels.attention_mass_from_qk(q, k, backend="triton"), expected, RTOL[dtype])
    # an exact lse given by the caller
    exact_lse = torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), -1).float()
    assert_rel(sat_kernels.attention_mass_from_qk(q, k, exact_lse, backend="triton"), expected, RTOL[dtype])
    # the torch path agrees too
    assert_rel(sat_kernels.attention_mass_from_qk(q, k, lse, backend="torch"), expected, FLASH_RTOL[dtype])



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_mass_from_qk_without_lse_is_one_exact_pass(dtype, monkeypatch):
    """The CPU path without lse normalizes each query chunk's whole rows itself. Small chunks
    (5 query rows, odd so the last is short) and scores in the hundreds (exp overflows fp32
    without the max shift) must still give the materialized softmax's mass."""
    monkeypatch.setattr(reference, "_MAX_BLOCK_ELEMENTS", 5 * 2 * 2 * 56)
    shape = (2, 2, 63, 56, 40)
    q, k = make_qk(shape, dtype, "transposed", seed=3, gain=40.0)
    scale = shape[-1] ** -0.5
    assert (scale * q.float() @ k.float().transpose(-1, -2)).abs().max() > 100
    expected = mass_oracle(softmax64(q, k, scale))
    assert_rel(sat_kernels.attention_mass_from_qk(q, k, backend="torch"), expected, RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mass_from_qk_explicit_scale(dtype):
    shape = (2, 2, 40, 56, 40)
    q, k = make_qk(shape, dtype, "transposed", seed=1, gain=1.0)
    scale = 0.3  # not D ** -0.5 (0.158): a kernel ignoring it would be off by far more than rtol
    expected = mass_oracle(softmax64(q, k, scale))
    lse = flash_lse(q, k, scale)
    got = sat_kernels.attention_mass_from_qk(q, k, lse, scale=scale, backend="triton")
    assert_rel(got, expected, FLASH_RTOL[dtype])
    assert_rel(sat_kernels.attention_mass_from_qk(q, k, scale=scale, backend="triton"), expected, RTOL[dtype])
    assert_rel(ops.attention_mass_from_qk(q, k, None, scale), expected, RTOL[dtype])


def test_mass_from_qk_strided_lse_and_split_grid():
    """lse sliced from a padded (B, H, Nq_pad) buffer (xformers/efficient-attention layout), and
    the GPU's split grid (heads and query tiles shared by several programs) under the interpreter."""
    shape = (2, 3, 63, 45, 40)
    q, k = make_qk(shape, torch.float32, "transposed", seed=2)
    scale = shape[-1] ** -0.5
    expected = mass_oracle(softmax64(q, k, scale))
    padded = torch.full((2, 3, 96), float("nan"))
    padded[..., :63] = torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), -1).float()
    lse = padded[..., :63]
    assert not lse.is_contiguous()
    assert_rel(ops.attention_mass_from_qk(q, k, lse, scale), expected, 1e-5)
    for split in [(3, 1), (1, 2), (3, 2)]:  # (SPLIT_H, SPLIT_Q) -> summed (SPLIT, B, Nk) buffer
        assert_rel(ops.attention_mass_from_qk(q, k, lse, scale, split=split), expected, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]], ids=str)
def test_attention_lse_equals_logsumexp(shape, dtype):
    q, k = make_qk(shape, dtype, "transposed", seed=3, gain=4.0)  # large scores: online max matters
    scale = shape[-1] ** -0.5
    expected = torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), dim=-1)
    lse = ops.attention_lse(q, k, scale)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    torch.testing.assert_close(lse.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("probs_layout", ["3d", "4d", "4d-strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_mass_from_probs(dtype, probs_layout):
    b, heads, nq, nk = 2, 3, 63, 40
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(3 * torch.randn(b, heads, nq, nk, generator=g), dim=-1).to(dtype)
    expected = probs.double().sum(dim=2).mean(dim=1)  # independent of reference.attention_mass
    if probs_layout == "3d":  # diffusers' head_to_batch_dim layout: row b*heads + h
        given = probs.reshape(b * heads, nq, nk)
    elif probs_layout == "4d":
        given = probs
    else:  # a (B, heads, Nq, Nk) view of a (B, Nk, heads, Nq) buffer: no unit stride on Nk
        given = probs.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        assert given.stride(-1) != 1 and torch.equal(given, probs)
    assert_rel(sat_kernels.attention_mass(given, heads, backend="triton"), expected, 1e-5)
    assert_rel(sat_kernels.attention_mass(given, heads, backend="torch"), expected, 1e-5)
    four_d = given if given.dim() == 4 else given.view(b, heads, nq, nk)
    assert_rel(ops.attention_mass(four_d, heads, split=(3, 2)), expected, 1e-5)


def test_mass_from_qk_of_materialized_map_matches_attention_mass():
    """Both Triton paths (from probs, from q/k) give the same mass; columns sum to Nq."""
    shape = (1, 2, 64, 64, 40)
    q, k = make_qk(shape, torch.float32, "contiguous", seed=5)
    scale = 1 / math.sqrt(40)
    probs = softmax64(q, k, scale).float()
    from_probs = sat_kernels.attention_mass(probs.reshape(2, 64, 64), 2, backend="triton")
    from_qk = sat_kernels.attention_mass_from_qk(q, k, backend="triton")
    torch.testing.assert_close(from_qk, from_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_qk.sum(dim=1), torch.tensor([64.0]), rtol=1e-5, atol=0)


def test_results_are_detached_float32():
    q, k = make_qk((1, 2, 16, 16, 40), torch.float32, "contiguous", seed=6)
    q.requires_grad_(True)
    mass = ops.attention_mass_from_qk(q, k, None, 40**-0.5)
    probs = softmax64(q.detach(), k, 40**-0.5).float().requires_grad_(True)
    assert not mass.requires_grad and not ops.attention_mass(probs, 2).requires_grad
    assert mass.dtype == torch.float32
    torch.testing.assert_close(mass, reference.attention_mass_from_qk(q.detach(), k), rtol=1e-5, atol=1e-6)


# float64 in, float64 out (reference.compute_dtype): inputs with full 53-bit mantissas held to a
# relative 1e-12 of the float64 formula, a bound float32 arithmetic misses by orders of magnitude
F64_RTOL = 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_inputs_are_computed_and_returned_in_float64(backend):
    # 3 heads: the head mean's 1/3 is inexact; Nq, Nk not tile multiples. Drawn in float64: values
    # float32 cannot hold, so reading them as float32 shows
    g = torch.Generator().manual_seed(7)
    q = 2 * torch.randn(2, 3, 40, 20, dtype=torch.float64, generator=g)
    k = torch.randn(2, 3, 24, 20, dtype=torch.float64, generator=g)
    scale = 0.3  # not a power of two
    scores = scale * q @ k.transpose(-1, -2)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])  # the formula, in float64
    expected = probs.sum(dim=2).mean(dim=1)
    results = {
        "from probs": sat_kernels.attention_mass(probs.reshape(6, 40, 24), 3, backend=backend),
        "from q, k": sat_kernels.attention_mass_from_qk(q, k, scale=scale, backend=backend),
        "from q, k, lse": sat_kernels.attention_mass_from_qk(q, k, lse, scale, backend=backend),
        # the compute dtype is float64 when q or k is
        "from q, float32 k": sat_kernels.attention_mass_from_qk(q, k.float(), lse=None, scale=scale,
                                                                backend=backend),
    }
    if backend == "triton":  # the GPU's split grid (partial sums of heads and query tiles)
        results["from probs, split"] = ops.attention_mass(probs, 3, split=(3, 2))
        results["from q, k, split"] = ops.attention_mass_from_qk(q, k, None, scale, split=(3, 2))
        results["lse"] = ops.attention_lse(q, k, scale)
    for name, got in results.items():
        want = expected
        if name == "from q, float32 k":
            want = torch.softmax(scale * q @ k.float().double().transpose(-1, -2), -1).sum(2).mean(1)
        if name == "lse":
            want = lse
        assert got.dtype == torch.float64, name
        assert got.shape == want.shape, name
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= F64_RTOL, f"{name}: max relative error {err:.2e} > {F64_RTOL:.0e}"
    # the bound has teeth: the same formula in float32 misses it
    in_fp32 = torch.softmax(scale * q.float() @ k.float().transpose(-1, -2), -1).sum(2).mean(1)
    assert ((in_fp32.double() - expected).abs().max() / expected.abs().max()).item() > 1e3 * F64_RTOL
