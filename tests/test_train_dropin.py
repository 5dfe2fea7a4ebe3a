"""sat_train.dropin on a UNet built here from a UNet2DConditionModel config (not sat_train's demo),
with a LoRA added by peft directly: guided_prediction equals the step written out with materialized
attention probabilities and sat_kernels.reference, for SAC and CAC, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor
from peft import LoraConfig

import sat_train
from sat_kernels import reference
from sat_train.guide.settings import GuideSettings
from sat_train.demo import build_tokenizer
from sat_train.guide.dropin import caption_token_positions, guided_prediction, install_sat_capture
from train_helpers import ProbsStoringProcessor, two_level_unet

HEADS = 2


def other_trainers_unet(prediction_type: str):
    unet = two_level_unet(HEADS)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    return unet, scheduler


def batch(unet, scheduler):
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([150, 650])
    return scheduler.add_noise(x0, noise, t), x0, t, torch.randn(2, 10, 24, generator=g)


def written_out(unet, scheduler, noisy, x0, t, cond, ratio, guide, tokens=None):
    unet.set_attn_processor(AttnProcessor())
    mid = ProbsStoringProcessor()
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(mid)
    highres = [unet.down_blocks[0].attentions[0], *unet.up_blocks[1].attentions]  # level 0 of this UNet
    stores = [ProbsStoringProcessor() for _ in highres]
    for transformer, store in zip(highres, stores, strict=True):
        transformer.transformer_blocks[0].attn2.set_processor(store)
    pred = unet(noisy, t, cond).sample
    ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = pred if scheduler.config.prediction_type == "epsilon" else ab.sqrt() * pred + (1 - ab).sqrt() * noisy
    if guide == "sac":
        saliency, threshold = reference.attention_mass(mid.probs[0], HEADS), 1.0
    else:
        maps = []
        for store in stores:
            probs = store.probs[0].view(2, HEADS, 256, 10).mean(dim=1)
            maps.append(torch.stack([probs[b][:, tokens[b].clamp(min=0)] * (tokens[b] >= 0) for b in range(2)]))
        saliency, threshold = torch.stack(maps).mean(dim=0).amax(dim=-1), "mean"
    side = math.isqrt(saliency.shape[1])
    x_deg = reference.degrade_latents(x0, eps, saliency, (side, side), scheduler.alphas_cumprod, t, threshold, 9, 1.0)
    return pred + ratio * (pred - unet(x_deg, t, cond).sample), saliency, threshold


def grads(unet):
    out = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("guide, prediction_type, ratio_given_to", [("sac", "epsilon", "call"),
                                                                     ("cac", "v_prediction", "call"),
                                                                     ("sac", "epsilon", "install")])
def test_guided_prediction_matches_written_out_step(guide, prediction_type, ratio_given_to):
    unet, scheduler = other_trainers_unet(prediction_type)
    noisy, x0, t, cond = batch(unet, scheduler)
    tokens = torch.tensor([[2, 7], [4, -1]]) if guide == "cac" else None
    expected, saliency, threshold = written_out(unet, scheduler, noisy, x0, t, cond, 0.3, guide, tokens)
    expected.pow(2).mean().backward()
    expected_grads = grads(unet)
    mask = saliency > (saliency.mean(dim=1, keepdim=True) if threshold == "mean" else threshold)
    assert mask.any() and not mask.all()

    if ratio_given_to == "call":
        handle = install_sat_capture(unet, guide=guide, attention_backend="sdpa", kernel_backend="torch")
        got, info = guided_prediction(unet, noisy, x0, t, cond, scheduler, handle, ratio=0.3, tokens=tokens)
    else:  # the settings given whole, once
        handle = install_sat_capture(unet, guide=guide, attention_backend="sdpa", kernel_backend="torch",
                                     settings=GuideSettings(ratio=0.3))
        got, info = guided_prediction(unet, noisy, x0, t, cond, scheduler, handle, tokens=tokens)
    got.pow(2).mean().backward()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for name, grad in grads(unet).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    side = math.isqrt(mask.shape[1])
    up = torch.nn.functional.interpolate(mask.view(2, 1, side, side).float(), size=(16, 16), mode="nearest")[:, 0]
    assert torch.equal(info["mask"], up > 0.5)
    assert info["used_cac"].tolist() == ([True, True] if guide == "cac" else [False, False])


def test_caption_token_positions_and_lazy_reexport():
    tok = build_tokenizer()
    tokens = caption_token_positions(tok, ["a face and a nose", "a spacesuit"], "face,nose")
    nose = tok("nose", add_special_tokens=False).input_ids
    assert tokens.tolist() == [[2] + list(range(5, 5 + len(nose))), [-1] * (1 + len(nose))]
    assert sat_train.guided_prediction is guided_prediction and sat_train.install_sat_capture is install_sat_capture


def test_cac_handle_needs_tokens():
    unet, scheduler = other_trainers_unet("epsilon")
    handle = install_sat_capture(unet, guide="cac", attention_backend="sdpa")
    with pytest.raises(ValueError, match="tokens"):
        guided_prediction(unet, *batch(unet, scheduler), scheduler, handle)
