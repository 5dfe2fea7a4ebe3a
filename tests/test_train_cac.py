"""CAC (--guide cac): word → token positions, the map from q/k against materialized cross-attention
probabilities, the step against a written-out reference (with a SAC fallback sample), gradient
checkpointing, an end-to-end run counting fallbacks, and the step's peak memory."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

from benchmarks.memory import LiveTensorBytes
from sat_kernels import reference
from sat_train.guide.capture import CrossAttentionCapture, MidBlockCapture, mid_block_self_attention, stock_processor
from sat_train.data.dataset import build_dataset, collate
from sat_train.data.records import read_records
from sat_train.models.family import tokenize
from sat_train.models.words import word_token_ids, word_token_positions
from sat_train.demo import build_tokenizer
from sat_train.guide.settings import GuideSettings
from sat_train.guide.guidance import CaptionWordSaliency, Guide, MidBlockSaliency, SATGuide
from sat_train import train
from sat_train.models.family import SD15
from train_helpers import (DEMO_DATA_DIR, ProbsStoringProcessor, count_forwards, lora_grads, lora_unet, step_inputs,
                           tiny_config)

WORDS = "face,eyes,eye,hair,hand,hands,mouth,nose".split(",")


def demo_highres_attn2(unet):
    """Written out for the demo UNet: level-0 blocks are down_blocks[0] (1 layer) and up_blocks[2] (2)."""
    return [unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2,
            unet.up_blocks[2].attentions[0].transformer_blocks[0].attn2,
            unet.up_blocks[2].attentions[1].transformer_blocks[0].attn2]


# ----------------------------------------------------------------------------- token positions


def test_word_positions_multi_token_words_and_captions_without_words():
    tok = build_tokenizer()
    word_ids = word_token_ids(tok, WORDS)

    def ids_of(text):
        return tok(text, add_special_tokens=False).input_ids

    hand, face = ids_of("hand"), ids_of("face")
    assert len(hand) == 3 and len(face) == 1  # "hand" is not a whole-word merge in the demo vocab
    caption = "a photo of a hand, face and thand"
    start = 1 + len(ids_of("a photo of a"))  # after <|startoftext|>
    after_hand = start + len(hand) + len(ids_of(","))
    expected = list(range(start, start + len(hand))) + [after_hand]  # "thand" does not count
    ids = tokenize(tok, [caption])[0]
    got = word_token_positions(tok, ids, word_ids)
    assert got == expected
    assert ids[got].tolist() == hand + face
    # case-insensitive (CLIP lower-cases), several words, repeated words
    got = word_token_positions(tok, tokenize(tok, ["Eyes and EYES, hair"])[0], word_ids)
    assert got == [1, 1 + len(ids_of("eyes and")), 1 + len(ids_of("eyes and eyes,"))]
    assert word_token_positions(tok, tokenize(tok, ["a photo of a spacesuit"])[0], word_ids) == []


def test_dataset_and_collate_give_padded_positions(tmp_path):
    config = tiny_config(tmp_path, guide="cac", cac_words="astronaut,face")
    records, names = read_records(config, DEMO_DATA_DIR)
    dataset = build_dataset(config, records, names, [build_tokenizer()], SD15())
    tok = build_tokenizer()
    rows = [dataset[i]["cac_tokens"] for i in range(len(dataset))]
    for (_, caption), row in zip(records, rows, strict=True):
        # the picked tokens spell exactly the caption's chosen words, in order
        words = [w for w in (t.strip(",.'") for t in caption.lower().split()) if w in ("face", "astronaut")]
        ids = tokenize(tok, [caption])[0]
        spelled = "".join(tok.convert_ids_to_tokens(ids[row].tolist())).replace("</w>", " ").split()
        assert spelled == words and words
    batch = collate([dataset[0], dataset[2]])
    assert batch["cac_tokens"].shape == (2, max(len(rows[0]), len(rows[2])))
    torch.testing.assert_close(batch["cac_tokens"][1, : len(rows[2])], rows[2])
    assert (batch["cac_tokens"][1, len(rows[2]):] == -1).all()
    no_words = build_dataset(tiny_config(tmp_path, guide="cac", cac_words="hands"), records, names, [tok], SD15())
    assert collate([no_words[0], no_words[1]])["cac_tokens"].tolist() == [[-1], [-1]]
    assert "cac_tokens" not in build_dataset(tiny_config(tmp_path, guide="sac"), records, names, [tok], SD15())[0]


# ----------------------------------------------------------------------------- the CAC map and step

TOKENS = torch.tensor([[3, 5, 9], [-1, -1, -1]])  # sample 1 has none of the words: SAC fallback


def materialized_cac_map(components, s, tokens, layers=demo_highres_attn2):
    """Eager attention everywhere; the highest-res attn2 layers (``layers(unet)``, written out per model)
    keep their softmax probabilities."""
    unet = components.unet
    unet.set_attn_processor(AttnProcessor())
    stores = []
    for attn2 in layers(unet):
        stores.append(ProbsStoringProcessor())
        attn2.set_processor(stores[-1])
    mid = ProbsStoringProcessor()
    mid_block_self_attention(unet).set_processor(mid)
    pred = unet(s.noisy, s.timesteps, s.cond, added_cond_kwargs=s.added_cond_kwargs).sample  # SDXL: pooled, time ids
    batch, heads = s.x0.shape[0], layers(unet)[0].heads
    per_layer = []
    for store in stores:
        probs = store.probs[0]  # (B*heads, N, 77)
        probs = probs.view(batch, heads, *probs.shape[1:]).mean(dim=1)  # head mean (B, N, 77)
        picked = torch.stack([probs[b][:, tokens[b].clamp(min=0)] * (tokens[b] >= 0) for b in range(batch)])
        per_layer.append(picked)
    cac = torch.stack(per_layer).mean(dim=0).amax(dim=-1)  # layers mean, tokens max → (B, N)
    mass = reference.attention_mass(mid.probs[0], mid_block_self_attention(unet).heads)
    return pred, cac, mass, (stores, mid)


def written_out_cac_step(components, s, ratio, cac_map_size, mid_map_size, layers=demo_highres_attn2):
    """DESIGN.md's CAC step with materialized maps, sample 0 by its words, sample 1 by the SAC fallback:
    (loss, the CAC map (B, h*w), the LoRA gradients of backward, cleared from the UNet afterwards)."""
    unet, ac = components.unet, components.noise_scheduler.alphas_cumprod
    pred, cac, mass, _ = materialized_cac_map(components, s, s.tokens, layers)
    assert cac.shape == (2, cac_map_size[0] * cac_map_size[1])
    x_cac = reference.degrade_latents(s.x0, pred, cac, cac_map_size, ac, s.timesteps, "mean", 9, 1.0)
    x_sac = reference.degrade_latents(s.x0, pred, mass, mid_map_size, ac, s.timesteps, 1.0, 9, 1.0)
    pred_deg = unet(torch.cat([x_cac[:1], x_sac[1:]]), s.timesteps, s.cond, added_cond_kwargs=s.added_cond_kwargs
                    ).sample
    loss = F.mse_loss(pred + ratio * (pred - pred_deg), s.target)
    loss.backward()
    grads = lora_grads(unet)
    unet.zero_grad(set_to_none=True)
    return loss, cac, grads


def cac_guide(components, kernels="torch", ratio=0.5, backend="sdpa", **settings):
    unet = components.unet
    unet.set_attn_processor(stock_processor(backend))
    saliency = CaptionWordSaliency(MidBlockSaliency(MidBlockCapture(unet, kernels)),
                                   CrossAttentionCapture(unet, kernels))
    return SATGuide(saliency, components.noise_scheduler.alphas_cumprod,
                    GuideSettings(ratio=ratio, threshold=1.0, kernel_backend=kernels, **settings))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cac_map_from_token_probs_equals_materialized_probs(kernels):
    components = lora_unet()
    s = step_inputs(components, size=16)
    _, expected, _, _ = materialized_cac_map(components, s, TOKENS)
    capture = cac_guide(components, kernels).saliency.cross
    assert [hook.module for hook in capture.hooks] == demo_highres_attn2(components.unet)
    capture.arm(TOKENS)
    with torch.no_grad():
        components.unet(s.noisy, s.timesteps, s.cond)
    got, size = capture.take()
    assert size == (16, 16) and got.shape == (2, 256)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert got[0].std() > 0 and (got[1] == 0).all()  # padding tokens give 0


def test_cac_step_matches_written_out_reference_with_fallback():
    components = lora_unet()
    s = step_inputs(components, size=16)
    s.tokens = TOKENS
    unet, ratio = components.unet, 0.5
    ac = components.noise_scheduler.alphas_cumprod
    pred, cac, mass, (stores, _) = materialized_cac_map(components, s, TOKENS)
    x_cac = reference.degrade_latents(s.x0, pred, cac, (16, 16), ac, s.timesteps, "mean", 9, 1.0)
    side = math.isqrt(mass.shape[1])
    x_sac = reference.degrade_latents(s.x0, pred, mass, (side, side), ac, s.timesteps, 1.0, 9, 1.0)
    x_deg = torch.cat([x_cac[:1], x_sac[1:]])  # sample 0 by its words, sample 1 falls back to SAC
    pred_deg = unet(x_deg, s.timesteps, s.cond).sample
    assert len(stores[0].probs) == 2
    ref_loss = F.mse_loss(pred + ratio * (pred - pred_deg), s.target)
    ref_loss.backward()
    ref_grads = lora_grads(unet)
    unet.zero_grad(set_to_none=True)

    guide = cac_guide(components, ratio=ratio)
    result = guide(unet, s)
    result.loss.backward()
    assert torch.allclose(result.loss, ref_loss, rtol=0, atol=1e-5), (result.loss.item(), ref_loss.item())
    for name, grad in lora_grads(unet).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert (guide.saliency.fallbacks, guide.saliency.samples, result.cac_fallback.item()) == (1, 2, 0.5)
    cac_mask = cac[0] > cac[0].mean()
    assert 0 < cac_mask.float().mean() < 1, "a partial CAC mask makes the comparison meaningful"
    assert torch.equal(result.mask[0].flatten(), cac_mask)
    # without words for anyone the CAC guide is exactly the SAC guide
    s.tokens = torch.full((2, 1), -1)
    sac = SATGuide(guide.saliency.mid, components.noise_scheduler.alphas_cumprod, guide.settings)
    with torch.no_grad():
        torch.testing.assert_close(guide(unet, s).loss, sac(unet, s).loss, rtol=0, atol=0)


def set_lora_scale(unet, scale: float) -> None:
    """Every LoRA layer's scaling (alpha / r = 1 here) set by hand: 0 removes LoRA from the forward."""
    for module in unet.modules():
        if isinstance(getattr(module, "scaling", None), dict):
            module.scaling["default"] = scale


def test_cac_separate_capture_matches_the_original_three_forward_step():
    """--guide_capture separate with CAC: the original code's step, written out. Its maps come from
    an extra forward with LoRA off in every layer; then pred with LoRA, the degraded forward, the loss."""
    components = lora_unet()
    s = step_inputs(components, size=16)
    s.tokens = TOKENS
    unet, ratio = components.unet, 0.5
    ac = components.noise_scheduler.alphas_cumprod
    set_lora_scale(unet, 0.0)
    with torch.no_grad():
        _, cac, mass, _ = materialized_cac_map(components, s, TOKENS)
    set_lora_scale(unet, 1.0)
    pred = unet(s.noisy, s.timesteps, s.cond).sample
    x_cac = reference.degrade_latents(s.x0, pred, cac, (16, 16), ac, s.timesteps, "mean", 9, 1.0)
    side = math.isqrt(mass.shape[1])
    x_sac = reference.degrade_latents(s.x0, pred, mass, (side, side), ac, s.timesteps, 1.0, 9, 1.0)
    pred_deg = unet(torch.cat([x_cac[:1], x_sac[1:]]), s.timesteps, s.cond).sample
    ref_loss = F.mse_loss(pred + ratio * (pred - pred_deg), s.target)
    ref_loss.backward()
    ref_grads = lora_grads(unet)
    unet.zero_grad(set_to_none=True)

    guide = cac_guide(components, ratio=ratio, capture="separate")
    calls = count_forwards(unet)
    result = guide(unet, s)
    result.loss.backward()
    assert calls[0] == 3 == guide.forwards_per_step
    assert torch.allclose(result.loss, ref_loss, rtol=0, atol=1e-5), (result.loss.item(), ref_loss.item())
    for name, grad in lora_grads(unet).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(result.mask[0].flatten(), cac[0] > cac[0].mean())
    # the inline capture sees LoRA: another map, another loss (so the comparison above is not vacuous)
    inline = cac_guide(components, ratio=ratio)(unet, s)
    assert abs(inline.loss.item() - result.loss.item()) > 1e-6
    assert all(not layer.disable_adapters for layer in unet.modules() if hasattr(layer, "disable_adapters")
               and isinstance(getattr(layer, "scaling", None), dict)), "LoRA must be on again after the capture"


@pytest.mark.parametrize("recompute", [False, True], ids=["", "guide_recompute"])
def test_cac_capture_is_one_shot_under_gradient_checkpointing(recompute):
    results = {}
    for checkpointing in (False, True):
        components = lora_unet()
        s = step_inputs(components, size=16)
        s.tokens = TOKENS
        # with checkpointing, recompute reruns the first forward in backward, around the UNet's own reruns
        guide = cac_guide(components, recompute=checkpointing and recompute)
        if checkpointing:
            components.unet.enable_gradient_checkpointing()
        calls = [0]
        for hook in guide.saliency.cross.hooks:
            original = hook.reduce
            hook.reduce = lambda *a, _o=original: (calls.__setitem__(0, calls[0] + 1), _o(*a))[1]
        result = guide(components.unet, s)
        result.loss.backward()
        results[checkpointing] = (result.loss.detach(), lora_grads(components.unet), calls[0])
    assert results[False][2] == results[True][2] == 3  # three layers, each captured once per step
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-6)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cac_run_end_to_end_counts_fallbacks(tmp_path, capsys):
    # one epoch of the 6 demo photos; only 2 captions say "astronaut": 4 fall back to SAC
    train(tiny_config(tmp_path, guide="cac", cac_words="astronaut", max_train_steps=3))
    out = capsys.readouterr().out
    assert "guide=cac (2 UNet forwards/step)" in out
    assert "CAC: 4 of 6 samples had none of --cac_words (astronaut)" in out
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


# ----------------------------------------------------------------------------- memory


def step_peak(guide, unet, s) -> int:
    meter = LiveTensorBytes()
    with meter:
        guide(unet, s).loss.backward()
    unet.zero_grad(set_to_none=True)
    return meter.peak


def test_cac_step_peak_memory_at_64x64_latents():
    meter = LiveTensorBytes()
    with meter:  # the meter sees a known allocation
        x = torch.ones(1 << 20)
        del x
    assert meter.peak >= 4 << 20
    components = lora_unet()
    s = step_inputs(components, batch=1, size=64)
    s.tokens = torch.tensor([[3, 5]])
    unet = components.unet
    full = cac_guide(components)
    alphas = components.noise_scheduler.alphas_cumprod
    detached = SATGuide(full.saliency, alphas, dataclasses.replace(full.settings, detach_degraded=True))
    recomputed = SATGuide(full.saliency, alphas, dataclasses.replace(full.settings, recompute=True))
    sac = SATGuide(full.saliency.mid, alphas, full.settings)
    none = step_peak(Guide(), unet, s)
    peaks = {"cac": step_peak(full, unet, s), "cac_detached": step_peak(detached, unet, s),
             "cac_recompute": step_peak(recomputed, unet, s), "sac": step_peak(sac, unet, s)}
    # the capture adds nothing worth counting: no stored attention map (a materialized 64x64-token
    # self-attention map alone would be 2 heads x 4096^2 x 4 B = 128 MiB, ~3x the whole plain step)
    assert peaks["cac"] <= 1.05 * peaks["sac"], (peaks, none)
    # one forward's activations kept for backward: within 1.3x of a plain step ...
    assert peaks["cac_detached"] <= 1.3 * none, (peaks, none)
    assert peaks["cac_recompute"] <= 1.3 * none, (peaks, none)
    # ... and two (gradients through both forwards, as the method's math has it) about 2x
    assert 1.5 * none < peaks["cac"] < 2.3 * none, (peaks, none)
    assert math.isfinite(none) and none > 10 << 20
