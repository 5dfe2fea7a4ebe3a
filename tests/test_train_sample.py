"""sat_train.sample / sat_train.sag: SAG sampling equals diffusers' StableDiffusionSAGPipeline,
the CLI is deterministic for a seed, SAG and the LoRA change the images, a demo run's LoRA loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionSAGPipeline
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image
from safetensors.torch import load_file

from sat_train import sample
from sat_train.outputs.lora_files import save_lora
from sat_train.guide.sag import sag_sample
from sat_train import train
from train_helpers import lora_unet, tiny_config

PROMPT = "a portrait photo of a woman, face, eyes"


@pytest.mark.parametrize("guidance_scale, kernels", [(7.5, "torch"), (1.0, "torch"), (7.5, "triton")])
def test_sag_sampling_matches_diffusers_sag_pipeline(guidance_scale, kernels):
    """Our SAG (mask from q/k in SDPA, fused degrade) against diffusers' SAG pipeline (eager attention,
    stored probabilities, conv blur), same DDIM schedule and initial noise; with and without CFG."""
    components = lora_unet()
    ours = sag_sample(components, PROMPT, num_inference_steps=3, height=64, width=64, sag_scale=1.0,
                      guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0),
                      attention_backend="sdpa", kernel_backend=kernels, output_type="latent")
    unet = components.unet
    unet.set_attn_processor(AttnProcessor())
    pipe = StableDiffusionSAGPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, num_inference_steps=3, height=64, width=64, sag_scale=1.0, guidance_scale=guidance_scale,
                  generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    no_sag = sag_sample(components, PROMPT, num_inference_steps=3, height=64, width=64, sag_scale=0.0,
                        guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0),
                        output_type="latent")
    assert (no_sag - theirs).abs().max() > 1e-2  # SAG changes the result: the comparison can fail


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run_sample(lora, out, *extra):
    return sample.main(["--lora", str(lora), "--prompt", PROMPT, "--num_inference_steps", "2", "--resolution", "64",
                        "--output_dir", str(out), *extra])


def test_sample_cli_deterministic_sag_and_lora_change_images(tmp_path):
    components = lora_unet()  # random LoRA B: the LoRA changes outputs
    save_lora(components.unet, tmp_path / "lora")  # no train_config.json: the demo model is the base
    first = run_sample(tmp_path / "lora", tmp_path / "a", "--seed", "0", "--num_images", "2")
    again = run_sample(tmp_path / "lora", tmp_path / "b", "--seed", "0", "--num_images", "2")
    assert [p.name for p in first] == ["seed0-sag0.75-0.png", "seed0-sag0.75-1.png"]
    for a, b in zip(first, again, strict=True):
        assert Image.open(a).size == (64, 64)
        assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))  # two images, two noises
    no_sag = run_sample(tmp_path / "lora", tmp_path / "c", "--seed", "0", "--sag_scale", "0")[0]
    other_seed = run_sample(tmp_path / "lora", tmp_path / "d", "--seed", "1")[0]
    no_lora = run_sample(tmp_path / "lora", tmp_path / "e", "--seed", "0", "--lora_scale", "0")[0]
    for other in (no_sag, other_seed, no_lora):
        assert np.abs(pixels(other) - pixels(first[0])).max() > 0, other


def test_demo_run_lora_is_usable_by_sample(tmp_path):
    lora_file = train(tiny_config(tmp_path, max_train_steps=1))
    args = sample.build_parser().parse_args(["--lora", str(tmp_path), "--prompt", PROMPT])
    components, source = sample.load_pipeline_components(args, torch.device("cpu"))
    assert source is None  # the demo model, read from train_config.json
    saved = load_file(lora_file)
    loaded = {n: p for n, p in components.unet.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():  # unet.<module>.lora.down/up.weight → <module>.lora_A/B.sat.weight
        module = key.removeprefix("unet.").replace(".lora.down.weight", "").replace(".lora.up.weight", "")
        which = "lora_A" if key.endswith("down.weight") else "lora_B"
        assert torch.equal(loaded[f"{module}.{which}.sat.weight"], value), key
    assert run_sample(tmp_path, tmp_path / "out")[0].is_file()
