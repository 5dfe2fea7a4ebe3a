"""SDXL sampling: sag_sample on the tiny SDXL equals diffusers' StableDiffusionXLPipeline without SAG
and a SAG loop written here from the paper's math with it; ``python -m sat_train.sample`` on an SDXL
folder (and a demo run on the tiny SDXL) with a LoRA file saved by diffusers; validation / sample
prompts on SDXL against diffusers' pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

from sat_train import demo, sample
from sat_train.errors import UsageError
from sat_train.guide.sag import sag_sample
from sat_train.outputs.sample_prompts import parse_prompt_line
from sat_train.models.lora import add_text_encoder_lora
from sat_train.outputs.samples import generate_images
from train_helpers import ProbsStoringProcessor, lora_unet

PROMPT = "a portrait photo of a woman, face, eyes"


def sdxl_lora_components():
    return lora_unet(build=demo.build_sdxl_components)


def xl_pipeline(components, scheduler=None, force_zeros_for_empty_prompt=True):
    """diffusers' own SDXL pipeline on ``components`` (DDIM from the model's config by default)."""
    pipe = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
        scheduler=scheduler or DDIMScheduler.from_config(components.noise_scheduler.config),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def reference_sag_latents(pipe, prompt, negative, steps, guidance, sag_scale, width, height, seed, block=0):
    """SAG (Hong et al. 2023) written out for SDXL, eager attention everywhere: CFG; pred_x0 from the
    uncond eps; mask = mass > 1 of the uncond half's materialized softmax in the mid block's
    ``block``-th attn1, nearest-upsampled; Gaussian blur (9, sigma 1) of pred_x0 inside the mask;
    re-noised with the uncond eps; the degraded forward on the uncond half's text, pooled and time ids;
    eps + s (eps_u - eps_deg); DDIM eta 0. Returns the final latents and each step's mask coverage."""
    unet = pipe.unet
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    cfg = guidance > 1
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        prompt, device=torch.device("cpu"), do_classifier_free_guidance=cfg, negative_prompt=negative or None)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)  # original, crop, target
    cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    uncond = {"encoder_hidden_states": neg_embeds,
              "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": time_ids}} if cfg else cond
    store = ProbsStoringProcessor()
    unet.set_attn_processor(AttnProcessor())
    layer = unet.mid_block.attentions[0].transformer_blocks[block].attn1
    layer.set_processor(store)
    latents = torch.randn(1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))
    mid_scale = 2 ** (len(unet.config.block_out_channels) - 1)  # the mid block runs after every downsample
    coverage = []
    for t in scheduler.timesteps:
        store.probs.clear()
        if cfg:
            eps_u, eps_c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([neg_embeds, embeds]),
                                added_cond_kwargs={"text_embeds": torch.cat([neg_pooled, pooled]),
                                                   "time_ids": time_ids.repeat(2, 1)}).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = eps_u = unet(latents, t, **cond).sample
        if sag_scale > 0:
            probs = store.probs[0][:layer.heads]  # (batch * heads, N, N), batch-major: the uncond sample's heads
            mass = probs.mean(0).sum(0)  # the attention each token receives, averaged over heads
            map_size = (latents.shape[-2] // mid_scale, latents.shape[-1] // mid_scale)
            mask = F.interpolate((mass > 1).float().view(1, 1, *map_size), size=latents.shape[-2:], mode="nearest")
            ab = scheduler.alphas_cumprod[t]
            x0 = (latents - (1 - ab).sqrt() * eps_u) / ab.sqrt()
            degraded = mask * gaussian_blur_2d(x0, 9, 1.0) + (1 - mask) * x0
            degraded = ab.sqrt() * degraded + (1 - ab).sqrt() * eps_u
            eps = eps + sag_scale * (eps_u - unet(degraded, t, **uncond).sample)
            coverage.append(mask.mean().item())
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    return latents, coverage


def decoded(pipe, latents) -> np.ndarray:
    """``latents`` as diffusers' SDXL pipeline turns them into a PIL image, as an int array."""
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return np.asarray(pipe.image_processor.postprocess(image, output_type="pil")[0], dtype=int)


def ours_latents(components, negative="", width=64, height=64, guidance=7.5, sag_scale=0.0, **kwargs):
    return sag_sample(components, PROMPT, negative, 1, height, width, 3, guidance, sag_scale,
                      torch.Generator().manual_seed(0), "sdpa", output_type="latent", **kwargs)


@pytest.mark.parametrize("guidance, negative, force_zeros, width, height", [
    (7.5, "", True, 96, 64),  # empty negative: zeros, as the pipeline's default; non-square
    (7.5, "", False, 64, 64),  # force_zeros_for_empty_prompt=False: "" is encoded
    (7.5, "dark", True, 64, 96),
    (1.0, "", True, 64, 64),  # no CFG
])
def test_sag_scale_0_equals_sdxl_pipeline(guidance, negative, force_zeros, width, height):
    components = demo.build_sdxl_components()
    ours = ours_latents(components, negative, width, height, guidance, force_zeros_for_empty_prompt=force_zeros)
    theirs = xl_pipeline(components, force_zeros_for_empty_prompt=force_zeros)(
        PROMPT, negative_prompt=negative or None, num_inference_steps=3, width=width, height=height,
        guidance_scale=guidance, generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    if guidance > 1 and not negative:  # the empty negative's two encodings differ: the option is honoured
        other = ours_latents(components, negative, width, height, guidance,
                             force_zeros_for_empty_prompt=not force_zeros)
        assert (other - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("guidance, block, kernels, width, height", [
    (7.5, 0, "torch", 96, 64),
    (7.5, 1, "torch", 64, 64),  # the mid block's second transformer block (sag_sample's self_attention)
    (1.0, 0, "torch", 64, 64),
    (7.5, 0, "triton", 64, 96),
])
def test_sag_equals_reference_loop(guidance, block, kernels, width, height):
    """Ours (mask from q/k beside SDPA, fused degrade) against the loop above (eager attention,
    materialized softmax, diffusers' blur), same DDIM schedule, noise and LoRA UNet."""
    components = sdxl_lora_components()
    layer = f"mid_block.attentions[0].transformer_blocks[{block}].attn1"
    ours = ours_latents(components, "dark", width, height, guidance, sag_scale=1.0, kernel_backend=kernels,
                        self_attention=layer)
    theirs, coverage = reference_sag_latents(xl_pipeline(components), PROMPT, "dark", 3, guidance, 1.0, width, height,
                                             seed=0, block=block)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert any(0 < c < 1 for c in coverage), coverage  # a mask that blurs part of the image
    no_sag = ours_latents(components, "dark", width, height, guidance)
    assert (no_sag - theirs).abs().max() > 1e-2  # SAG changes the result: the comparison can fail


def test_sag_layer_choice_changes_the_mask():
    components = sdxl_lora_components()
    first, second = (reference_sag_latents(xl_pipeline(components), PROMPT, "", 3, 7.5, 1.0, 64, 64, 0, block)[1]
                     for block in (0, 1))
    assert first != second  # the two transformer blocks give different masks: the block test can fail


# ----------------------------------------------------------------------------- python -m sat_train.sample


def save_sdxl_lora(components, folder):
    """The UNet's LoRA as diffusers' SDXL LoRA example saves it."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(components.unet))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state)
    return folder / "pytorch_lora_weights.safetensors"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)


def run_sample(lora, out, *extra):
    return sample.main(["--lora", str(lora), "--prompt", PROMPT, "--num_inference_steps", "2", "--seed", "3",
                        "--output_dir", str(out), *extra])


def test_sample_cli_on_an_sdxl_folder_with_a_lora(tmp_path):
    base = demo.save_components(demo.build_sdxl_components(), tmp_path / "base")
    lora_file = save_sdxl_lora(sdxl_lora_components(), tmp_path / "lora")
    no_sag = run_sample(lora_file, tmp_path / "a", "--pretrained_model_name_or_path", str(base), "--resolution",
                        "96,64", "--sag_scale", "0")[0]
    sag = run_sample(lora_file, tmp_path / "b", "--pretrained_model_name_or_path", str(base), "--width", "96",
                     "--height", "64", "--sag_scale", "0.75", "--negative_prompt", "dark")[0]
    assert Image.open(no_sag).size == Image.open(sag).size == (96, 64)

    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=2, width=96, height=64, guidance_scale=7.5,  # SDXL pipeline default: 5
                generator=torch.Generator().manual_seed(3))
    without_lora = np.asarray(pipe(PROMPT, **call).images[0], dtype=int)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    call["generator"] = torch.Generator().manual_seed(3)
    with_lora = np.asarray(pipe(PROMPT, **call).images[0], dtype=int)
    assert np.abs(pixels(no_sag) - with_lora).max() <= 1  # uint8 rounding at most
    assert np.abs(with_lora - without_lora).max() > 1  # the LoRA shows: its loading is tested
    reference, _ = reference_sag_latents(pipe, PROMPT, "dark", 2, 7.5, 0.75, 96, 64, seed=3)
    assert np.abs(pixels(sag) - decoded(pipe, reference)).max() <= 1
    assert np.abs(pixels(sag) - pixels(no_sag)).max() > 1


def test_sdxl_base_takes_the_vae_flag_and_its_force_zeros_setting(tmp_path):
    base = demo.save_components(demo.build_sdxl_components(), tmp_path / "base")
    index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    assert index["force_zeros_for_empty_prompt"] is True  # diffusers' default, saved
    index["force_zeros_for_empty_prompt"] = False  # as some SDXL fine-tunes ship
    (base / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    other_vae = demo.build_sdxl_components(seed=1).vae
    other_vae.save_pretrained(tmp_path / "vae")
    lora_file = save_sdxl_lora(sdxl_lora_components(), tmp_path / "lora")
    args = sample.build_parser().parse_args(["--lora", str(lora_file), "--prompt", PROMPT, "--vae",
                                             str(tmp_path / "vae"), "--pretrained_model_name_or_path", str(base)])
    components, source = sample.load_pipeline_components(args, torch.device("cpu"))
    assert components.family.name == "sdxl" and source == str(base) and components.force_zeros_for_empty_prompt is False
    loaded, expected = components.vae.state_dict(), other_vae.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_demo_sdxl_run_loads_the_tiny_sdxl_at_its_default_size(tmp_path):
    lora_file = save_sdxl_lora(sdxl_lora_components(), tmp_path)
    (tmp_path / "train_config.json").write_text(json.dumps({"demo": True, "demo_model": "sdxl"}), encoding="utf-8")
    args = sample.build_parser().parse_args(["--lora", str(tmp_path), "--prompt", PROMPT])
    components, source = sample.load_pipeline_components(args, torch.device("cpu"))
    assert source is None and components.family.name == "sdxl"
    saved = load_file(lora_file)
    loaded = {n: p for n, p in components.unet.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():  # unet.<module>.lora.down/up.weight -> <module>.lora_A/B.sat.weight
        module, which = key.removeprefix("unet.").rsplit(".lora.", 1)
        name = f"{module}.{'lora_A' if which == 'down.weight' else 'lora_B'}.sat.weight"
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=key)
    image = run_sample(tmp_path, tmp_path / "out", "--sag_scale", "0.5")[0]
    pipe = xl_pipeline(demo.build_sdxl_components())
    side = pipe.default_sample_size * pipe.vae_scale_factor  # diffusers' SDXL default size
    assert Image.open(image).size == (side, side)


@pytest.mark.parametrize("layer, message", [
    ("mid_block.attentions[0].transformer_blocks[0].attn2", "is a Attention, not a self-attention layer"),
    ("mid_block.attentions.0.transformer_blocks.7.attn1", "has no such module"),
])
def test_a_sag_layer_that_is_no_self_attention_is_a_one_line_error(tmp_path, capsys, layer, message):
    """As training's --sac_layer: a cross-attention layer's map is 77 tokens wide, which SAG cannot blur by."""
    save_sdxl_lora(sdxl_lora_components(), tmp_path)
    (tmp_path / "train_config.json").write_text(json.dumps({"demo": True, "demo_model": "sdxl"}), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        run_sample(tmp_path, tmp_path / "out", "--resolution", "64", "--sag_layer", layer)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"sat_train.sample: error: --sag_layer {layer}") and message in error
    assert "\n" not in error and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--resolution", "64"], (64, 64)),
    (["--resolution", "96,64"], (96, 64)),
    (["--width", "96", "--height", "64"], (96, 64)),
    (["--W", "96"], (96, None)),
    ([], (None, None)),
    (["--resolution", "60"], "--resolution must be a multiple of 8"),
    (["--height", "100"], "--height must be a multiple of 8"),
    (["--resolution", "96x64"], "is not a size"),
    (["--resolution", "96,64", "--width", "64"], "keep one"),
    (["--resolution", "40,32"], "--sag_scale needs images of at least 40 px a side"),
    (["--height", "32"], "--sag_scale needs images of at least 40 px"),
    (["--resolution", "40,32", "--sag_scale", "0"], (40, 32)),
])
def test_sample_size_flags(flags, expected):
    args = sample.build_parser().parse_args(["--lora", "x", "--prompt", "p", *flags])
    if isinstance(expected, str):
        with pytest.raises(UsageError, match=expected):
            sample.image_size(args)
    else:
        assert sample.image_size(args) == expected


# ----------------------------------------------------------------------------- validation / sample prompts


@pytest.fixture
def training_sdxl():
    """The LoRA SDXL in training mode, LoRA dropout on the second text encoder's LoRA (random B): an
    image drawn without eval mode would differ from the pipeline's."""
    components = sdxl_lora_components()
    torch.manual_seed(1)
    add_text_encoder_lora(components.text_encoder_2, rank=4, dropout=0.5)
    with torch.no_grad():
        for name, param in components.text_encoder_2.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    for model in (components.unet, components.text_encoder, components.text_encoder_2):
        model.train()
    return components


def reference_image(components, prompt, scheduler_class) -> np.ndarray:
    """diffusers' SDXL pipeline with ``scheduler_class``, or the SAG loop above for a --sag line."""
    if prompt.sag_scale > 0:
        pipe = xl_pipeline(components)
        latents, _ = reference_sag_latents(pipe, prompt.prompt, prompt.negative_prompt, prompt.steps, prompt.cfg_scale,
                                           prompt.sag_scale, prompt.width, prompt.height, seed=5)
        return decoded(pipe, latents)
    pipe = xl_pipeline(components, scheduler_class.from_config(components.noise_scheduler.config))
    return np.asarray(pipe(prompt.prompt, negative_prompt=prompt.negative_prompt or None,
                           num_inference_steps=prompt.steps, guidance_scale=prompt.cfg_scale,
                           width=prompt.width, height=prompt.height,
                           generator=torch.Generator().manual_seed(5)).images[0], dtype=int)


@pytest.mark.parametrize("line, scheduler_class", [
    ("a face, eyes --s 3 --d 5 --w 96 --h 64 --n dark --ss euler_a", EulerAncestralDiscreteScheduler),
    ("a face, eyes --s 3 --d 5 --w 64 --h 96 --sag 1.0 --ss ddim", None),
])
def test_generate_images_on_sdxl_matches_diffusers(training_sdxl, line, scheduler_class):
    components = training_sdxl
    prompt = parse_prompt_line(line, "test:1").with_defaults(64, "ddim")
    ours = np.asarray(generate_images(components, components.unet, prompt, torch.Generator().manual_seed(5),
                                      torch.float32, "sdpa")[0], dtype=int)
    models = (components.unet, components.text_encoder, components.text_encoder_2)
    assert all(model.training for model in models)  # training modes restored
    assert ours.shape == (prompt.height, prompt.width, 3)
    with torch.no_grad():
        with_dropout = reference_image(components, prompt, scheduler_class)  # still in training mode
        for model in models:
            model.eval()
        theirs = reference_image(components, prompt, scheduler_class)
    assert np.abs(ours - theirs).max() <= 1  # uint8 rounding at most
    assert np.abs(with_dropout - theirs).max() > 1  # eval mode shows: the text encoders' switch is tested


@pytest.mark.parametrize("line", ["a face, eyes --s 3 --d 5 --w 64 --h 64 --ss ddim",
                                  "a face, eyes --s 3 --d 5 --w 64 --h 64 --sag 1.0 --ss ddim"])
def test_training_samples_honour_the_models_force_zeros_setting(tmp_path, line):
    """A model whose model_index.json turns force_zeros_for_empty_prompt off: training's samples (no
    --n: an empty negative prompt) encode "" as StableDiffusionXLPipeline.from_pretrained of it would."""
    from sat_train.config.settings import TrainConfig
    from sat_train.models.load import load_components

    base = demo.save_components(demo.build_sdxl_components(), tmp_path / "base")
    index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    (base / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}),
                                           encoding="utf-8")
    components = load_components(TrainConfig(pretrained_model_name_or_path=str(base)))
    assert StableDiffusionXLPipeline.from_pretrained(base).config.force_zeros_for_empty_prompt is False
    prompt = parse_prompt_line(line, "test:1").with_defaults(64, "ddim")
    ours = np.asarray(generate_images(components, components.unet, prompt, torch.Generator().manual_seed(5),
                                      torch.float32, "sdpa")[0], dtype=int)
    expected = {}
    for force_zeros in (False, True):
        pipe = xl_pipeline(components, force_zeros_for_empty_prompt=force_zeros)
        if prompt.sag_scale > 0:
            latents, _ = reference_sag_latents(pipe, prompt.prompt, "", prompt.steps, prompt.cfg_scale,
                                               prompt.sag_scale, 64, 64, seed=5)
            expected[force_zeros] = decoded(pipe, latents)
        else:
            expected[force_zeros] = np.asarray(pipe(prompt.prompt, num_inference_steps=prompt.steps, width=64,
                                                    height=64, guidance_scale=prompt.cfg_scale,
                                                    generator=torch.Generator().manual_seed(5)).images[0], dtype=int)
    assert np.abs(ours - expected[False]).max() <= 1
    assert np.abs(expected[True] - expected[False]).max() > 1  # the setting shows: the test can fail
