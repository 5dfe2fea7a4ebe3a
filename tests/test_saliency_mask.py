"""sat_kernels.saliency_mask: the Triton kernel (interpreter on CPU) against reference.py and
against torch's own ``F.interpolate(mode="nearest")`` of the thresholded map."""

import pytest
import torch
import torch.nn.functional as F

import sat_kernels
from sat_kernels import reference
from sat_kernels.ops import saliency_mask as mask_op


def mass_for(batch, map_size, dtype=torch.float32, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = map_size[0] * map_size[1]
    if strided:  # (B, N) view with token stride 2 and batch stride not N
        return (2 * torch.rand(batch, 2 * n + 3, generator=g)).to(dtype)[:, 1 : 2 * n + 1 : 2]
    return (2 * torch.rand(batch, n, generator=g)).to(dtype)


CASES = [  # batch, map_size, size, threshold, dtype, strided
    (2, (7, 9), None, 1.0, torch.float32, False),
    (2, (7, 9), (63, 65), 1.0, torch.float32, True),  # scale does not divide
    (1, (8, 8), (64, 64), "mean", torch.float16, False),  # exact 8x
    (3, (4, 4), (8, 8), 0.5, torch.bfloat16, True),  # exact 2x (torch's shift fast path)
    (2, (16, 16), (12, 20), "mean", torch.float32, False),  # downsampling
    (1, (5, 3), (17, 300), 1.0, torch.float64, False),  # wide output: several column tiles on GPU
]


@pytest.mark.parametrize("batch,map_size,size,threshold,dtype,strided", CASES)
def test_saliency_mask_matches_reference(batch, map_size, size, threshold, dtype, strided):
    mass = mass_for(batch, map_size, dtype, strided)
    out = sat_kernels.saliency_mask(mass, map_size, threshold, size, backend="triton")
    ref = reference.saliency_mask(mass, map_size, threshold, size)
    assert out.dtype == torch.bool
    assert out.shape == (batch, *(size or map_size))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("size", [(63, 65), (13, 7), (40, 40)])
def test_saliency_mask_matches_torch_interpolate(size):
    """Independent of reference.py: threshold by hand, upsample with F.interpolate('nearest')."""
    map_size = (7, 9)
    mass = mass_for(2, map_size, seed=1)
    expected = F.interpolate((mass > 1.0).view(2, 1, *map_size).float(), size=size, mode="nearest")[:, 0] > 0.5
    out = mask_op.saliency_mask(mass, map_size, 1.0, size)
    assert torch.equal(out, expected)
    assert 0 < expected.sum() < expected.numel()


def test_saliency_mask_mean_threshold_is_per_sample():
    """Sample 1 is sample 0 shifted by +5: a per-sample mean gives the same mask for both."""
    mass = mass_for(1, (6, 6), seed=2)
    mass = torch.cat([mass, mass + 5.0])
    out = mask_op.saliency_mask(mass, (6, 6), "mean", None)
    assert torch.equal(out[0], out[1])
    assert torch.equal(out[0], (mass[0] > mass[0].mean()).view(6, 6))


def test_saliency_mask_from_probabilities():
    """Probabilities with heads= go through the attention mass first (public API)."""
    heads, n = 2, 12
    probs = torch.softmax(3 * torch.randn(2 * heads, n, n, generator=torch.Generator().manual_seed(3)), -1)
    mass = reference.attention_mass(probs, heads)
    assert (mass - 1.0).abs().min() > 1e-3
    out = sat_kernels.saliency_mask(probs, (3, 4), 1.0, (9, 10), heads=heads, backend="triton")
    assert torch.equal(out, reference.saliency_mask(mass, (3, 4), 1.0, (9, 10)))
