"""Non-square saliency maps, as aspect-ratio buckets give them (--enable_bucket): at 384x640 px SD's
mid-block map is 6x10 tokens (latents 48x80). The kernels against reference.py and diffusers' SAG
``sag_masking`` on such maps (both backends), the capture's (h, w), the mask picture's overlay, and
a guided SAC / CAC step of the tiny UNet on 8x16 latents against the step written out with
materialized attention probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from diffusers.pipelines.deprecated.stable_diffusion_sag import pipeline_stable_diffusion_sag as sag

import sat_kernels
from sat_kernels import reference
from sat_train.guide.capture import MidBlockCapture, mid_block_self_attention, stock_processor
from sat_train.guide.guidance import StepInputs
from sat_train.outputs.pictures import MASK_COLOR, mask_preview
from test_degrade import latents, sag_self, saliency
from test_train_cac import TOKENS, cac_guide, written_out_cac_step
from test_train_guidance import sac_guide
from train_helpers import ProbsStoringProcessor, lora_grads, lora_unet

LATENTS_HW = (8, 16)  # the tiny UNet's latents of a 64x128 px bucket
MID_MAP_HW = (2, 4)  # its mid block: two stride-2 downsamples


def nonsquare_inputs(components, batch: int = 2, size=LATENTS_HW, seed: int = 1) -> StepInputs:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, *size, generator=gen)
    noise = torch.randn(batch, 4, *size, generator=gen)
    timesteps = torch.tensor([100, 700, 400, 900][:batch])
    cond = torch.randn(batch, 77, components.text_encoder.config.hidden_size, generator=gen)
    noisy = components.noise_scheduler.add_noise(x0, noise, timesteps)
    return StepInputs(x0=x0, noise=noise, noisy=noisy, timesteps=timesteps, cond=cond, target=noise)


# ----------------------------------------------------------------------------- kernels on a 6x10 map


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_degrade_on_sd_bucket_map_matches_diffusers_sag_masking(backend):
    shape, map_size, heads, t = (1, 4, 48, 80), (6, 10), 2, torch.tensor(420)
    self = sag_self(heads)
    x0, eps = latents(shape, seed=30), latents(shape, seed=31)
    probs, _, mass = saliency(1, map_size, "probs3", 1.0, heads=heads, seed=32)
    expected = sag.StableDiffusionSAGPipeline.sag_masking(self, x0, probs, map_size, t, eps)
    out = sat_kernels.degrade_latents(x0, eps, probs, map_size, self.scheduler.alphas_cumprod, t.expand(1),
                                      heads=heads, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)
    ref = reference.degrade_latents(x0, eps, mass, map_size, self.scheduler.alphas_cumprod, t.expand(1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    # the same tokens read as a 10x6 map put the blur elsewhere: (h, w) is used in its order
    transposed = reference.degrade_latents(x0, eps, mass, (10, 6), self.scheduler.alphas_cumprod, t.expand(1))
    assert not torch.allclose(transposed, expected, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_saliency_mask_on_sd_bucket_map_matches_sag_interpolation(backend):
    """diffusers' sag_masking: mass > 1 reshaped to (h, w), F.interpolate to the latents (nearest)."""
    map_size, size = (6, 10), (48, 80)
    _, _, mass = saliency(2, map_size, "mass", 1.0, seed=33)
    expected = F.interpolate((mass > 1.0).reshape(2, 1, *map_size).float(), size)[:, 0] > 0.5
    out = sat_kernels.saliency_mask(mass, map_size, 1.0, size, backend=backend)
    assert out.shape == (2, 48, 80) and torch.equal(out, expected)
    assert torch.equal(out, reference.saliency_mask(mass, map_size, 1.0, size))
    assert 0 < expected.sum() < expected.numel()


# ----------------------------------------------------------------------------- capture and pictures


def test_capture_records_height_and_width_of_the_mid_block():
    components = lora_unet()
    s = nonsquare_inputs(components)
    unet = components.unet
    unet.set_attn_processor(AttnProcessor())
    store = ProbsStoringProcessor()
    mid_block_self_attention(unet).set_processor(store)
    with torch.no_grad():
        unet(s.noisy, s.timesteps, s.cond)
    expected = reference.attention_mass(store.probs[0], mid_block_self_attention(unet).heads)

    unet.set_attn_processor(stock_processor("sdpa"))
    capture = MidBlockCapture(unet, "torch")
    capture.arm()
    with torch.no_grad():
        unet(s.noisy, s.timesteps, s.cond)
    mass, map_size = capture.take()
    assert map_size == MID_MAP_HW and mass.shape == (2, MID_MAP_HW[0] * MID_MAP_HW[1])
    torch.testing.assert_close(mass, expected, rtol=1e-5, atol=1e-6)


def test_mask_picture_overlays_a_nonsquare_mask_where_it_lies():
    components = lora_unet()
    pixels = torch.zeros(1, 3, 64, 128)  # a gray 64x128 px image (H, W)
    x0 = torch.zeros(1, 4, *LATENTS_HW)
    mask = torch.zeros(1, *MID_MAP_HW, dtype=torch.bool)
    mask[0, 0, 3] = True  # top-right token of the 2x4 map: pixels rows 0-31, columns 96-127
    grid = torch.from_numpy(np.array(mask_preview(pixels, x0, mask, components.vae)))
    assert grid.shape == (64, 3 * 128, 3)
    overlay = grid[:, 128:256].int()
    gray = 128  # 0 in [-1, 1]
    red = torch.tensor([round(gray * 0.45 + c * 0.55) for c in MASK_COLOR])
    assert (overlay[:32, 96:] == red).all()
    assert (overlay[32:] == gray).all() and (overlay[:, :96] == gray).all()


# ----------------------------------------------------------------------------- guided steps on 8x16 latents


def written_out_sac_loss(components, s, ratio):
    """DESIGN.md's SAC step with a materialized map of the non-square mid block and reference.py."""
    unet = components.unet
    unet.set_attn_processor(AttnProcessor())
    store = ProbsStoringProcessor()
    mid_block_self_attention(unet).set_processor(store)
    pred = unet(s.noisy, s.timesteps, s.cond).sample
    mass = reference.attention_mass(store.probs[0], mid_block_self_attention(unet).heads)
    x_deg = reference.degrade_latents(s.x0, pred, mass, MID_MAP_HW, components.noise_scheduler.alphas_cumprod,
                                      s.timesteps, 1.0, 9, 1.0)
    pred_deg = unet(x_deg, s.timesteps, s.cond).sample
    return F.mse_loss(pred + ratio * (pred - pred_deg), s.target), mass


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_sac_step_on_nonsquare_latents_matches_the_written_out_step(kernels):
    components = lora_unet()
    s = nonsquare_inputs(components)
    unet = components.unet
    ref_loss, mass = written_out_sac_loss(components, s, 0.5)
    ref_loss.backward()
    ref_grads = lora_grads(unet)
    unet.zero_grad(set_to_none=True)
    mask = mass > 1.0
    assert mask.any() and not mask.all(), "a partial mask makes the comparison meaningful"

    result = sac_guide(components, ratio=0.5, kernels=kernels)(unet, s)
    result.loss.backward()
    torch.testing.assert_close(result.loss, ref_loss, rtol=0, atol=1e-5)
    expected_mask = F.interpolate(mask.view(2, 1, *MID_MAP_HW).float(), LATENTS_HW)[:, 0] > 0.5
    assert torch.equal(result.mask, expected_mask)
    for name, grad in lora_grads(unet).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cac_step_on_nonsquare_latents_matches_the_written_out_step():
    components = lora_unet()
    s = nonsquare_inputs(components)
    s.tokens = TOKENS  # sample 1 has no chosen word: it falls back to the SAC map
    unet, ratio = components.unet, 0.5
    # the highest-res layers: one value per latent
    ref_loss, cac, ref_grads = written_out_cac_step(components, s, ratio, LATENTS_HW, MID_MAP_HW)

    result = cac_guide(components, ratio=ratio)(unet, s)
    result.loss.backward()
    torch.testing.assert_close(result.loss, ref_loss, rtol=0, atol=1e-5)
    cac_mask = (cac[0] > cac[0].mean()).view(LATENTS_HW)
    assert 0 < cac_mask.float().mean() < 1
    assert torch.equal(result.mask[0], cac_mask)
    for name, grad in lora_grads(unet).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
