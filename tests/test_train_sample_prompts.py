"""--sample_prompts: kohya-syntax prompt files, each sampler against diffusers' own pipeline, SAG lines
against diffusers' SAG pipeline, the files and TensorBoard images of a run, and the LoRA untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionSAGPipeline,
)
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image
from safetensors.torch import load_file

from sat_train.errors import UsageError
from sat_train.outputs.sample_prompts import SamplePrompt, parse_prompt_file, parse_prompt_line
from sat_train import train
from sat_train.outputs.samples import generate_images
from train_helpers import assert_same_tensors, lora_unet, run_cli, tiny_config

PROMPT_FILE = """\
# comment line, then a blank line

a portrait photo of a woman, face, eyes --n blurry, lowres --w 48 --h 32 --s 3 --d 42 --l 5.5
  # an indented comment
a photo of a man --SAG 0.75 --ss ddim --W 64
just a prompt, with commas
"""


def test_parser_reads_options_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPT_FILE, encoding="utf-8")
    assert parse_prompt_file(path) == [
        SamplePrompt("a portrait photo of a woman, face, eyes", negative_prompt="blurry, lowres", width=48, height=32,
                     steps=3, seed=42, cfg_scale=5.5, source=f"{path}:3"),
        SamplePrompt("a photo of a man", sag_scale=0.75, sampler="ddim", width=64, source=f"{path}:5"),
        SamplePrompt("just a prompt, with commas", source=f"{path}:6"),
    ]
    # kohya's defaults for the rest; the run's --resolution and --sample_sampler fill the unset ones
    last = parse_prompt_file(path)[2]
    assert (last.steps, last.cfg_scale, last.seed, last.sag_scale, last.negative_prompt) == (30, 7.5, None, 0.0, "")
    filled = last.with_defaults(resolution=64, sampler="euler_a")
    assert (filled.width, filled.height, filled.sampler) == (64, 64, "euler_a")


@pytest.mark.parametrize("line, message", [
    ("a face --x 3", "unknown option --x"),
    ("a face --g 3.5", "unknown option --g (a kohya option for other model families)"),
    ("a face --w big", "--w needs an integer, got 'big'"),
    ("a face --h 100", "--h must be a multiple of 8"),
    ("a face --s 0", "--s must be in 1..1000"),
    ("a face --s 1001", "--s must be in 1..1000"),
    ("a face --d 1.5", "--d needs an integer"),
    ("a face --l much", "--l needs a number"),
    ("a face --sag -1", "--sag must be a finite number >= 0"),
    ("a face --ss plms", "--ss 'plms' is not a sampler"),
    ("a face --n", "--n has no value"),
    ("a face --w 64 --w 64", "--w is given twice"),
    ("--w 64 --h 64", "no prompt text before the options"),
    ("a photo, --ar 16:9 in text", "unknown option --ar"),  # no quoting: " --" always starts an option
])
def test_malformed_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# header\na good prompt --w 64\n{line}\n", encoding="utf-8")
    with pytest.raises(UsageError) as err:
        parse_prompt_file(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, flags, message", [
    ("a face --sag 0.5 --ss euler_a", {}, ":1: --sag samples with its own DDIM sampler, not euler_a"),
    ("a face --sag 0.5", {"sample_sampler": "dpmsolver++"}, ":1: --sag samples with its own DDIM sampler"),
    ("a face --sag 0.5 --w 32 --h 32", {}, ":1: --sag needs images of at least 40 px"),
    ("a face --sag 0.5", {"resolution": 32, "guide": "none"}, ":1: --sag needs images of at least 40 px"),
    ("a face --s 3", {"sample_sampler": "pndm"}, ":1: the pndm sampler needs --s >= 4"),
    ("# only a comment\n\n", {}, "has no prompt lines"),
    ("a face", {"sample_every_n_steps": 0}, "--sample_every_n_steps must be >= 1"),
    ("a face", {"sample_every_n_steps": None}, "is never sampled"),
])
def test_config_checks_prompt_file_against_run_flags(tmp_path, content, flags, message):
    path = tmp_path / "prompts.txt"
    path.write_text(content, encoding="utf-8")
    settings = {"sample_prompts": str(path), "sample_every_n_steps": 2, **flags}
    with pytest.raises(UsageError) as err:
        tiny_config(tmp_path / "out", **settings).validate()
    assert message in str(err.value), str(err.value)


def test_flags_without_a_prompt_file_and_kohya_toml_are_refused(tmp_path):
    with pytest.raises(UsageError, match="give that file too"):
        tiny_config(tmp_path, sample_at_first=True).validate()
    with pytest.raises(UsageError, match="--sample_every_n_epochs must be >= 1"):
        tiny_config(tmp_path, sample_every_n_epochs=0).validate()
    toml = tmp_path / "prompts.toml"
    toml.write_text("[prompt]\n", encoding="utf-8")
    with pytest.raises(UsageError, match="only kohya's text form"):
        tiny_config(tmp_path, sample_prompts=str(toml), sample_at_first=True).validate()
    with pytest.raises(UsageError, match="cannot be read"):
        tiny_config(tmp_path, sample_prompts=str(tmp_path / "missing.txt"), sample_at_first=True).validate()


def test_cli_names_the_bad_line_and_exits_2_before_models_load(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a face --w 64\n\na face --w 65\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run_cli("--sample_prompts", str(path), "--sample_every_n_steps", "1", "--output_dir", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"sat-train: error: {path}:3: --w must be a multiple of 8 (the VAE's downscale), got 65; "
                     "use 64 or 72"], result.stderr
    assert not out.exists()  # nothing was written: the error came before the run started


# kohya's sampler names and the scheduler classes (and DPM-Solver variants) its get_my_scheduler picks
KOHYA_SAMPLERS = [
    ("ddim", DDIMScheduler, {}), ("pndm", PNDMScheduler, {}), ("lms", LMSDiscreteScheduler, {}),
    ("k_lms", LMSDiscreteScheduler, {}), ("euler", EulerDiscreteScheduler, {}),
    ("k_euler", EulerDiscreteScheduler, {}), ("euler_a", EulerAncestralDiscreteScheduler, {}),
    ("k_euler_a", EulerAncestralDiscreteScheduler, {}), ("heun", HeunDiscreteScheduler, {}),
    ("dpm_2", KDPM2DiscreteScheduler, {}), ("k_dpm_2", KDPM2DiscreteScheduler, {}),
    ("dpm_2_a", KDPM2AncestralDiscreteScheduler, {}), ("k_dpm_2_a", KDPM2AncestralDiscreteScheduler, {}),
    ("dpmsolver", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("dpmsolver++", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    ("dpmsingle", DPMSolverSinglestepScheduler, {}),
]


def reference_images(components, scheduler, prompt, negative, steps, cfg, seed, width, height):
    pipe = StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                   tokenizer=components.tokenizer, unet=components.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg, width=width,
                 height=height, generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image)


@pytest.fixture(scope="module")
def lora_components():
    return lora_unet()  # random LoRA B: the LoRA changes the images


@pytest.mark.parametrize("name, scheduler_class, overrides", KOHYA_SAMPLERS, ids=[s[0] for s in KOHYA_SAMPLERS])
def test_each_sampler_equals_diffusers_pipeline_with_its_scheduler(lora_components, name, scheduler_class, overrides):
    components = lora_components
    steps = 4 if name == "pndm" else 2  # diffusers' PNDM (its Runge-Kutta warmup) needs >= 4 steps
    line = f"a portrait of a woman, face --n dark hair --w 48 --h 32 --s {steps} --d 7 --l 6.0 --ss {name}"
    prompt = parse_prompt_line(line, "test:1").with_defaults(resolution=64, sampler="ddim")
    components.unet.train()
    ours = generate_images(components, components.unet, prompt, torch.Generator().manual_seed(prompt.seed),
                           torch.float32)
    assert components.unet.training  # back in training mode
    assert len(ours) == 1 and ours[0].size == (48, 32)
    config = components.noise_scheduler.config
    common = dict(prompt="a portrait of a woman, face", steps=steps, cfg=6.0, seed=7, width=48, height=32)
    theirs = reference_images(components, scheduler_class.from_config(config, **overrides), negative="dark hair",
                              **common)
    np.testing.assert_array_equal(np.asarray(ours[0]), theirs)
    # the comparison can fail: another scheduler gives another image
    other_class = EulerDiscreteScheduler if scheduler_class is DDIMScheduler else DDIMScheduler
    other = reference_images(components, other_class.from_config(config), negative="dark hair", **common)
    assert np.abs(other.astype(int) - theirs).max() > 0
    if name == "ddim":  # and so does leaving out the negative prompt
        no_negative = reference_images(components, scheduler_class.from_config(config), negative=None, **common)
        assert np.abs(no_negative.astype(int) - theirs).max() > 0


def test_mixed_precision_samples_under_autocast(lora_components):
    components = lora_components
    prompt = parse_prompt_line("a face --s 2 --d 4 --w 32 --h 32", "test:1").with_defaults(64, "ddim")
    ours = generate_images(components, components.unet, prompt, torch.Generator().manual_seed(4), torch.bfloat16)[0]
    common = dict(prompt="a face", negative=None, steps=2, cfg=7.5, seed=4, width=32, height=32)
    scheduler = DDIMScheduler.from_config(components.noise_scheduler.config)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = reference_images(components, scheduler, **common)
    np.testing.assert_array_equal(np.asarray(ours), theirs)
    full_precision = reference_images(components, scheduler, **common)
    assert np.abs(full_precision.astype(int) - theirs).max() > 0  # autocast shows in the image


def test_sag_line_equals_diffusers_sag_pipeline_and_keeps_the_processors(lora_components):
    components = lora_components
    prompt = parse_prompt_line("a portrait of a woman, face --sag 1.0 --s 3 --d 5 --w 64 --h 64 --n dark",
                               "test:1").with_defaults(resolution=64, sampler="ddim")
    unet = components.unet
    unet.set_attn_processor(AttnProcessor())  # stands for the guide's capture processors
    before = unet.attn_processors
    ours = generate_images(components, unet, prompt, torch.Generator().manual_seed(5), torch.float32, "sdpa")[0]
    assert unet.attn_processors == before  # same objects: SAG's sampler swapped them only while it ran
    pipe = StableDiffusionSAGPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt.prompt, negative_prompt="dark", num_inference_steps=3, height=64, width=64, sag_scale=1.0,
                  guidance_scale=7.5, generator=torch.Generator().manual_seed(5)).images[0]
    diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
    assert diff.max() <= 1, diff.max()  # rounding of the last uint8 step (latents agree to ~1e-5)
    no_sag = generate_images(components, unet, dataclasses.replace(prompt, sag_scale=0.0),
                             torch.Generator().manual_seed(5), torch.float32)[0]
    assert np.abs(np.asarray(no_sag, dtype=int) - np.asarray(theirs, dtype=int)).max() > 1  # SAG shows


SAMPLE_FILE = "a photo of a face --s 2 --w 32 --h 32 --d 3\na portrait, eyes --s 2 --sag 0.5 --ss ddim\n"


# LoRA dropout on: a sampling that left the UNet in eval mode (or moved the dropout RNG) changes the LoRA
TRAINING = dict(guide="sac", max_train_steps=4, lora_dropout=0.1)


def sample_config(out, prompts, **overrides):
    return tiny_config(out, **{**TRAINING, "sample_prompts": str(prompts), **overrides})


@pytest.fixture(scope="module")
def unsampled_lora(tmp_path_factory):
    """The 4-step run's LoRA without any sampling: what every sampled run must end with, bit for bit."""
    return load_file(train(tiny_config(tmp_path_factory.mktemp("plain"), **TRAINING)))


def assert_same_lora(got, expected):
    assert_same_tensors(got, expected)


def tensorboard_images(logs) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = {}
    for path in logs.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path)).Reload()
        for tag in acc.Tags()["images"]:
            images[tag] = [(e.step, e.width, e.height) for e in acc.Images(tag)]
    return images


def test_run_samples_at_first_and_every_n_steps_and_leaves_the_lora_alone(tmp_path, unsampled_lora):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(SAMPLE_FILE, encoding="utf-8")
    out = tmp_path / "run"
    lora = train(sample_config(out, prompts, sample_every_n_steps=2, sample_at_first=True, report_to="tensorboard"))
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [f"step{s:06d}_{i:02d}.png" for s in (0, 2, 4) for i in (0, 1)]
    sizes = {p.name: Image.open(p).size for p in (out / "samples").iterdir()}
    assert {sizes[f"step000002_{i:02d}.png"] for i in (0, 1)} == {(32, 32), (64, 64)}  # --w/--h, else --resolution
    sampled = {tag: events for tag, events in tensorboard_images(out / "logs").items() if tag.startswith("samples")}
    assert sampled == {"samples/00": [(0, 32, 32), (2, 32, 32), (4, 32, 32)],
                                                "samples/01": [(0, 64, 64), (2, 64, 64), (4, 64, 64)]}
    assert_same_lora(load_file(lora), unsampled_lora)  # sampling (SAG included) never moved the training


def test_resumed_sampled_run_equals_unsampled_run(tmp_path, unsampled_lora):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(SAMPLE_FILE, encoding="utf-8")
    out = tmp_path / "run"
    settings = dict(sample_every_n_steps=2, sample_at_first=True, checkpointing_steps=2)
    train(sample_config(out, prompts, **{**settings, "max_train_steps": 2}))
    first_part = sorted(p.name for p in (out / "samples").iterdir())
    assert first_part == ["step000000_00.png", "step000000_01.png", "step000002_00.png", "step000002_01.png"]
    for path in (out / "samples").iterdir():
        path.unlink()
    lora = train(sample_config(out, prompts, **settings, resume_from_checkpoint="latest"))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step000004_00.png", "step000004_01.png"]
    assert_same_lora(load_file(lora), unsampled_lora)


def test_every_n_epochs_overrides_steps_and_names_by_step(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a face --s 2 --w 32 --h 32\n", encoding="utf-8")
    out = tmp_path / "run"
    # 6 photos, batch 2: epochs end at steps 3 and 4 (the last, partial epoch); --sample_every_n_steps ignored
    train(sample_config(out, prompts, guide="none", sample_every_n_epochs=1, sample_every_n_steps=1))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step000003_00.png", "step000004_00.png"]
