"""The SAC step against the plain reference, forward counts, capture modes, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

from sat_kernels import reference
from sat_train.guide.capture import MidBlockCapture, mid_block_self_attention, stock_processor
from sat_train.guide.settings import GuideSettings
from sat_train.guide.guidance import Guide, MidBlockSaliency, SATGuide
from train_helpers import ProbsStoringProcessor, count_forwards, lora_grads, lora_unet, step_inputs


def sac_guide(components, backend="sdpa", ratio=0.5, separate=False, threshold=1.0, kernels="torch",
              prediction_type="epsilon", recompute=False, detach_degraded=False):
    components.unet.set_attn_processor(stock_processor(backend))
    capture = MidBlockCapture(components.unet, kernels)
    settings = GuideSettings(ratio=ratio, threshold=threshold, capture="separate" if separate else "inline",
                             kernel_backend=kernels, recompute=recompute, detach_degraded=detach_degraded)
    return SATGuide(MidBlockSaliency(capture), components.noise_scheduler.alphas_cumprod, settings, prediction_type)


def reference_sac_loss(components, s, ratio, threshold=1.0, prediction_type="epsilon"):
    """DESIGN.md's step written out with a materialized attention map and sat_kernels.reference."""
    unet = components.unet
    unet.set_attn_processor(AttnProcessor())
    store = ProbsStoringProcessor()
    mid_block_self_attention(unet).set_processor(store)
    pred = unet(s.noisy, s.timesteps, s.cond, added_cond_kwargs=s.added_cond_kwargs).sample  # SDXL: pooled, time ids
    probs = store.probs[0]  # (B*heads, N, N), diffusers' head_to_batch_dim layout
    heads = mid_block_self_attention(unet).heads
    mass = reference.attention_mass(probs, heads)
    side = math.isqrt(probs.shape[-1])
    noise_pred = pred
    if prediction_type == "v_prediction":  # x_t = a x0 + b eps, v = a eps - b x0  =>  eps = a v + b x_t
        ab = components.noise_scheduler.alphas_cumprod[s.timesteps].view(-1, 1, 1, 1)
        noise_pred = ab.sqrt() * pred + (1 - ab).sqrt() * s.noisy
    x_deg = reference.degrade_latents(s.x0, noise_pred, mass, (side, side), components.noise_scheduler.alphas_cumprod,
                                      s.timesteps, threshold, 9, 1.0)
    pred_deg = unet(x_deg, s.timesteps, s.cond, added_cond_kwargs=s.added_cond_kwargs).sample
    assert len(store.probs) == 2
    loss = F.mse_loss(pred + ratio * (pred - pred_deg), s.target)
    return loss, mass


@pytest.mark.parametrize("ratio, kernels", [(0.01, "torch"), (0.5, "torch"), (0.5, "triton")])
def test_sac_loss_and_grads_match_materialized_reference(ratio, kernels):
    """kernels="triton" runs sat_kernels' Triton kernels (interpreted on CPU) inside the step."""
    components = lora_unet()
    s = step_inputs(components)
    unet = components.unet

    ref_loss, ref_mass = reference_sac_loss(components, s, ratio)
    ref_loss.backward()
    ref_grads = lora_grads(unet)
    unet.zero_grad(set_to_none=True)
    mask = ref_mass > 1.0
    assert mask.any() and not mask.all(), "test needs a partial mask to be meaningful"

    guide = sac_guide(components, ratio=ratio, kernels=kernels)
    result = guide(unet, s)
    result.loss.backward()
    assert torch.allclose(result.loss, ref_loss, rtol=0, atol=1e-5), (result.loss.item(), ref_loss.item())
    assert result.mask_coverage.item() == pytest.approx(mask.float().mean().item() * 100)
    for name, grad in lora_grads(unet).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_v_prediction_renoises_with_the_noise_estimate():
    components = lora_unet()
    s = step_inputs(components)
    ref_loss, _ = reference_sac_loss(components, s, 0.5, prediction_type="v_prediction")
    eps_loss, _ = reference_sac_loss(components, s, 0.5)
    result = sac_guide(components, ratio=0.5, prediction_type="v_prediction")(components.unet, s)
    assert torch.allclose(result.loss, ref_loss, rtol=0, atol=1e-5), (result.loss.item(), ref_loss.item())
    assert abs(ref_loss.item() - eps_loss.item()) > 1e-5  # the conversion matters for this input


def test_guide_changes_the_loss():
    """The SAC loss is not the plain loss (guards against a guide that silently does nothing)."""
    components = lora_unet()
    s = step_inputs(components)
    result = sac_guide(components, ratio=0.5)(components.unet, s)
    plain = Guide()(components.unet, s)
    assert torch.allclose(result.pred_loss, plain.loss, atol=1e-6)
    assert abs(result.loss.item() - plain.loss.item()) > 1e-4


@pytest.mark.parametrize("guide_name, separate, recompute, expected",
                         [("none", False, False, 1), ("sac", False, False, 2), ("sac", True, False, 3),
                          ("sac", False, True, 3), ("sac", True, True, 4)])
def test_unet_forwards_per_step(guide_name, separate, recompute, expected):
    components = lora_unet()
    guide = Guide() if guide_name == "none" else sac_guide(components, separate=separate, recompute=recompute)
    calls = count_forwards(components.unet)
    guide(components.unet, step_inputs(components)).loss.backward()
    assert calls[0] == expected == guide.forwards_per_step


def test_inline_and_separate_capture_agree_with_zero_lora_b():
    components = lora_unet(randomize_b=False)  # fresh LoRA: B = 0, so dropping it changes nothing
    s = step_inputs(components)
    inline = sac_guide(components, ratio=0.5)
    capture = inline.saliency.capture
    capture.arm()
    components.unet(s.noisy, s.timesteps, s.cond)
    mass_inline, _ = capture.take()
    loss_inline = inline(components.unet, s).loss

    separate = sac_guide(components, ratio=0.5, separate=True)
    mass_separate = separate.saliency.capture_separately(components.unet, s, 1.0).maps[0].values
    loss_separate = separate(components.unet, s).loss
    torch.testing.assert_close(mass_separate, mass_inline, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_separate, loss_inline, rtol=0, atol=1e-6)


def test_separate_capture_drops_lora_in_the_captured_layer_only():
    """With non-zero LoRA the separate capture sees the layer without LoRA: its mass equals a
    forward where that layer's LoRA scaling is 0, and differs from the inline (LoRA) mass."""
    components = lora_unet()
    s = step_inputs(components)
    guide = sac_guide(components, separate=True)
    mass_separate = guide.saliency.capture_separately(components.unet, s, 1.0).maps[0].values

    inline = sac_guide(components).saliency.capture
    attn = mid_block_self_attention(components.unet)
    inline.arm()
    components.unet(s.noisy, s.timesteps, s.cond)
    mass_lora, _ = inline.take()
    for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
        layer.scaling["default"] = 0.0
    inline.arm()
    components.unet(s.noisy, s.timesteps, s.cond)
    mass_no_lora, _ = inline.take()
    torch.testing.assert_close(mass_separate, mass_no_lora, rtol=0, atol=1e-6)
    assert (mass_separate - mass_lora).abs().max() > 1e-4
    # and the bypass ended with the capture: the next forward uses LoRA in that layer again
    for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
        layer.scaling["default"] = 1.0
    assert not guide.saliency.capture.hook.bypass_lora


def test_separate_capture_matches_the_original_three_forward_step():
    """--guide_capture separate with SAC: the original code's step, written out. The mass comes from an
    extra eager forward with the captured layer's LoRA scaled to 0; then pred with LoRA, the degraded
    forward and the loss; values and gradients."""
    components = lora_unet()
    s = step_inputs(components)
    unet, ratio = components.unet, 0.5
    attn = mid_block_self_attention(unet)
    unet.set_attn_processor(AttnProcessor())
    store = ProbsStoringProcessor()
    attn.set_processor(store)
    for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
        layer.scaling["default"] = 0.0
    with torch.no_grad():
        unet(s.noisy, s.timesteps, s.cond)
    for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
        layer.scaling["default"] = 1.0
    mass = reference.attention_mass(store.probs[0], attn.heads)
    side = math.isqrt(mass.shape[1])
    pred = unet(s.noisy, s.timesteps, s.cond).sample
    x_deg = reference.degrade_latents(s.x0, pred, mass, (side, side), components.noise_scheduler.alphas_cumprod,
                                      s.timesteps, 1.0, 9, 1.0)
    ref_loss = F.mse_loss(pred + ratio * (pred - unet(x_deg, s.timesteps, s.cond).sample), s.target)
    ref_loss.backward()
    ref_grads = lora_grads(unet)
    unet.zero_grad(set_to_none=True)

    result = sac_guide(components, ratio=ratio, separate=True)(unet, s)
    result.loss.backward()
    torch.testing.assert_close(result.loss, ref_loss, rtol=0, atol=1e-5)
    for name, grad in lora_grads(unet).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    inline = sac_guide(components, ratio=ratio)(unet, s)  # with LoRA in the capture: another loss
    assert abs(inline.loss.item() - ref_loss.item()) > 1e-6


def test_gradient_checkpointing_gives_same_loss_and_grads():
    results = {}
    for checkpointing in (False, True):
        components = lora_unet()
        if checkpointing:
            components.unet.enable_gradient_checkpointing()
        components.unet.train()
        guide = sac_guide(components, ratio=0.5)
        calls = count_module_calls(mid_block_self_attention(components.unet))
        result = guide(components.unet, step_inputs(components))
        result.loss.backward()
        results[checkpointing] = (result.loss.detach(), lora_grads(components.unet), calls[0])
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results[False], results[True]
    # two forwards, and with checkpointing both are recomputed in backward (arming is one-shot)
    assert (calls_a, calls_b) == (2, 4), "checkpointing must re-run the captured layer in backward"
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def count_module_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_capture_survives_set_attn_processor_and_its_removal_is_an_error():
    components = lora_unet()
    s = step_inputs(components)
    guide = sac_guide(components)
    expected = guide(components.unet, s).loss
    components.unet.set_attn_processor(AttnProcessor())  # the hook stays: same step with eager attention
    torch.testing.assert_close(guide(components.unet, s).loss, expected, rtol=0, atol=1e-5)
    guide.saliency.remove_hooks()
    with pytest.raises(RuntimeError, match="SAC capture at mid_block.attentions.0.transformer_blocks.0.attn1 did not run"):
        guide(components.unet, s)


def test_bf16_autocast_step_close_to_fp32():
    """Under bf16 autocast the capture reads bf16 q/k; the loss stays near the fp32 loss."""
    components = lora_unet()
    s = step_inputs(components)
    guide = sac_guide(components, ratio=0.5)
    fp32 = guide(components.unet, s).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = guide(components.unet, s).loss.item()
    assert bf16 == pytest.approx(fp32, rel=0.05)


def test_detach_degraded_keeps_the_loss_and_drops_the_degraded_gradient():
    """--guide_detach_degraded: same loss value; gradients equal those of the reference loss with
    the degraded prediction held constant, and differ from the full step's."""
    ratio = 0.5
    components = lora_unet()
    s = step_inputs(components)
    unet = components.unet

    full = sac_guide(components, ratio=ratio)(unet, s)
    full.loss.backward()
    full_grads = lora_grads(unet)
    unet.zero_grad(set_to_none=True)

    guide = sac_guide(components, ratio=ratio, detach_degraded=True)
    detached = guide(unet, s)
    detached.loss.backward()
    detached_grads = lora_grads(unet)
    unet.zero_grad(set_to_none=True)

    # reference: the step written out, with pred_deg computed under no_grad
    guide.saliency.capture.arm()
    pred = unet(s.noisy, s.timesteps, s.cond).sample
    mass, map_size = guide.saliency.capture.take()
    with torch.no_grad():
        x_deg = reference.degrade_latents(s.x0, pred, mass, map_size, components.noise_scheduler.alphas_cumprod,
                                          s.timesteps)
        pred_deg = unet(x_deg, s.timesteps, s.cond).sample
    F.mse_loss(pred + ratio * (pred - pred_deg), s.target).backward()
    ref_grads = lora_grads(unet)

    torch.testing.assert_close(detached.loss, full.loss, rtol=0, atol=1e-6)
    for name, grad in detached_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert max((detached_grads[n] - full_grads[n]).abs().max() for n in full_grads) > 1e-6


@pytest.mark.parametrize("separate", [False, True], ids=["inline", "separate"])
def test_recompute_keeps_the_step_exact(separate):
    """--guide_recompute reruns the first forward in backward: same loss, same gradients, and the
    rerun does not capture again (the mass of the step is the one of the first forward)."""
    components = lora_unet()
    s = step_inputs(components)
    results = {}
    for recompute in (False, True):
        guide = sac_guide(components, separate=separate, recompute=recompute)
        captures = [0]
        hook = guide.saliency.capture.hook
        original = hook.reduce
        hook.reduce = lambda *a: (captures.__setitem__(0, captures[0] + 1), original(*a))[1]
        result = guide(components.unet, s)
        result.loss.backward()
        results[recompute] = (result.loss.detach(), result.mask, lora_grads(components.unet), captures[0])
        components.unet.zero_grad(set_to_none=True)
    (loss, mask, grads, captures), (loss_r, mask_r, grads_r, captures_r) = results[False], results[True]
    assert captures == captures_r == 1
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=1e-6)
    assert torch.equal(mask_r, mask)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-4, atol=1e-7, msg=name)
