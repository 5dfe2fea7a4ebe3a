"""The embedded default: a tiny SD-v1.5-shaped model and bundled photos, so that
``python -m sat_train`` trains offline on a CPU in under a minute (22 s on 2 quiet cores).

The SD v1.5 demo (``--demo_model sd15``) fine-tunes a LoRA on a tiny pretrained base shipped in
assets/demo_model/ (made by assets/make_demo_model.py: a VAE that reconstructs photos, a UNet and text
encoder that draw the six bundled photos from their captions), loaded as any model folder is
(models.load.load_folder, its checksums checked). It has SD v1.5's block types (CrossAttnDownBlock2D ...
UNetMidBlock2DCrossAttn ... CrossAttnUpBlock2D), cross-attention on CLIP text embeddings, an
AutoencoderKL with SD's 8x downsampling and a CLIP tokenizer, at toy widths.

``build_components`` / ``build_sdxl_components`` are the tests' tiny models: the same structure at
smaller widths with seeded random weights (they learn nothing; they exercise exactly the code path a
real run takes). The SDXL demo trains the random one; so does the SD v1.5 demo when the environment
sets DEMO_MODEL_ENV to "random" (the tests do: their runs need only the shapes, and stay fast).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import UsageError
from .models.components import Components
from .models.words import clip_tokenizer

DEMO_DATA_DIR = Path(__file__).with_name("assets") / "demo_data"
DEMO_MODEL_DIR = Path(__file__).with_name("assets") / "demo_model"
DEMO_MODEL_ENV = "SAT_DEMO_MODEL"  # "random": the SD v1.5 demo trains build_components' random model
DEMO_SEED = 0
MODEL_MAX_LENGTH = 77
# Caption words that become single tokens (whole-word BPE merges), e.g. for picking "face" later.
WORDS = ("a photo portrait of woman man face eyes hair smiling brown short dark half-body head and shoulders "
         "astronaut camera close-up black white with in the").split()

BANNER = """\
=== sat_train DEMO: a LoRA on a tiny pretrained SD-v1.5-shaped model, {n} bundled photos (offline, CPU) ===
The base (a few MB) draws the bundled photos from their captions, at 128 px: see masks/ (photo | where SAT
blurs | the blurred copy) and validation/. To train Stable Diffusion v1.5 instead:
  python -m sat_train --guide sac \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --train_data_dir YOUR_IMAGES --resolution 512 --train_batch_size 4 --mixed_precision fp16
(YOUR_IMAGES holds the images and a metadata.jsonl with lines {{"file_name": "a.jpg", "text": "a caption"}})"""

SDXL_BANNER = """\
=== sat_train DEMO: a tiny random SDXL-shaped model on {n} bundled photos (offline, CPU) ===
It shows the SDXL training path (two text encoders, text_time conditioning) and the SAT guidance working;
its weights are random, so its images are noise. To train Stable Diffusion XL instead:
  python -m sat_train --guide sac \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
      --train_data_dir YOUR_IMAGES --resolution 1024 --train_batch_size 1 --mixed_precision fp16
(YOUR_IMAGES holds the images and a metadata.jsonl with lines {{"file_name": "a.jpg", "text": "a caption"}})"""

def banner(demo_model: str, num_samples: int) -> str:
    return (SDXL_BANNER if demo_model == "sdxl" else BANNER).format(n=num_samples)


def build_demo_components(demo_model: str = "sd15") -> Components:
    """The tiny model --demo_model names: SD v1.5's pretrained one (load_demo_model; build_components'
    random one when the environment's DEMO_MODEL_ENV says "random"), SDXL's random one."""
    if demo_model == "sdxl":
        return build_sdxl_components()
    if os.environ.get(DEMO_MODEL_ENV) == "random":
        return build_components()
    return load_demo_model()


def load_demo_model(folder: str | Path | None = None) -> Components:
    """The shipped pretrained demo model (``folder``: DEMO_MODEL_DIR), through the loader of a user's model
    folder (which checks the folder's recorded checksums first)."""
    from transformers.utils import logging as transformers_logging

    from .models.load import load_folder

    # transformers' "Loading weights" bar for a 80 kB text encoder is chatter in the demo's first lines
    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return load_folder(str(folder or DEMO_MODEL_DIR))
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()


# The demo's mask pictures (output_dir/masks/): every 10 steps, so steps 10, 20 and 30 (the last) of its 30.
MASK_PREVIEW_STEPS = 10


def check_demo_flag(config) -> None:
    if config.demo_model != "sd15" and not config.is_demo:
        raise UsageError(f"--demo_model {config.demo_model} picks the embedded demo's model: drop it when you give "
                         "--pretrained_model_name_or_path or data (an SDXL folder is recognised by itself)")


def mask_preview_steps(config) -> int | None:
    """How often a run writes mask pictures: ``--mask_preview_steps`` when given; in the demo without it
    every MASK_PREVIEW_STEPS steps and at the end, so the README's first command shows where SAT blurs.
    Not one of demo_defaults: those fill the flag itself, and the flag is an error with --guide none,
    which has no mask to show."""
    if config.mask_preview_steps is not None:
        return config.mask_preview_steps
    return MASK_PREVIEW_STEPS if config.is_demo and config.guide != "none" else None


def demo_defaults() -> dict:
    """Settings the demo uses for every flag the user did not give (the same for both --demo_model)."""
    return {
        "resolution": 128,
        "train_batch_size": 2,
        "max_train_steps": 30,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "center_crop": False,
        "random_flip": True,
        "seed": DEMO_SEED,
        "checkpointing_steps": 15,
        "checkpoints_total_limit": 2,
        "rank": 4,
        # a training caption (person_01.jpg's): the base draws its six photos, not new prompts
        "validation_prompt": ("a head and shoulders portrait of a woman astronaut, detailed face, brown eyes, "
                              "short hair"),
        "num_validation_images": 2,
        "validation_epochs": 10,  # 3 steps per epoch: once, at the end
        "output_dir": "sat-demo-output",
    }


def build_tokenizer(pad_token: str = "<|endoftext|>"):
    """A byte-level CLIP BPE tokenizer: the 256 byte symbols (+ end-of-word forms) and whole-word merges;
    it pads with ``pad_token`` (SD v1.5's and SDXL's first: the end token; SDXL's second: "!")."""
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    merges = []
    for word in dict.fromkeys(w for w in WORDS if re.fullmatch(r"[a-z]+", w)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return clip_tokenizer(vocab, merges, model_max_length=MODEL_MAX_LENGTH, pad_token=pad_token)


def build_components(seed: int = DEMO_SEED) -> Components:
    """Tiny SD-v1.5-shaped components with weights from ``seed`` (independent of the global RNG)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    devices = []  # fork_rng restores the caller's generator: the demo model never shifts a run's randomness
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
        vae = tiny_vae(scaling_factor=0.18215)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=32, attention_head_dim=2)  # SD v1.5 semantics: 2 heads per layer
    return Components(tokenizer, text_encoder, vae, unet, training_scheduler())


def text_encoder_config(tokenizer, hidden: int = 32):
    """A tiny CLIP text encoder's config for ``tokenizer`` (SD v1.5's, and each of SDXL's two)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH,
                          projection_dim=32, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_vae(scaling_factor: float):
    """An AutoencoderKL with SD's 8x downsampling at toy widths (weights from the global generator)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, sample_size=128, scaling_factor=scaling_factor)


def training_scheduler():
    """SD v1.5's (and SDXL's) noise schedule as diffusers' training examples load it."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, steps_offset=1, prediction_type="epsilon")


# The tiny SDXL's text encoders: CLIP-L-like (penultimate hidden states) and CLIP-G-like (also pooled).
SDXL_TEXT_HIDDEN = (32, 32)
SDXL_POOLED_DIM = 32  # text_encoder_2's projection_dim (text_encoder_config's): the UNet's "text_embeds"
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim: each of the 6 time ids embeds to this many features


def build_sdxl_components(seed: int = DEMO_SEED) -> Components:
    """Tiny SDXL-shaped components with weights from ``seed`` (independent of the global RNG).

    SDXL's structure at toy widths: no attention at level 0 (DownBlock2D / UpBlock2D), two
    transformer blocks in the mid block (SDXL's has ten), ``text_time`` conditioning (the pooled
    output of the second text encoder + 6 time ids), cross-attention on both encoders' penultimate
    hidden states concatenated, SDXL's VAE scaling factor. Its second tokenizer pads with "!" as
    SDXL's does."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")

    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_encoder_config(tokenizer, SDXL_TEXT_HIDDEN[0]))
        text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(tokenizer_2, SDXL_TEXT_HIDDEN[1]))
        vae = tiny_vae(scaling_factor=0.13025)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 2, 4), use_linear_projection=True,  # heads per level, as SDXL's (5, 10, 20)
            cross_attention_dim=sum(SDXL_TEXT_HIDDEN), addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_EMBED_DIM)
    return Components(tokenizer, text_encoder, vae, unet, training_scheduler(), tokenizer_2, text_encoder_2)


def save_components(components: Components, folder: str | Path) -> Path:
    """Writes the diffusers folder layout (SD v1.5's, or SDXL's with model_index.json), loadable with
    --pretrained_model_name_or_path folder (and SDXL's with StableDiffusionXLPipeline.from_pretrained)."""
    folder = Path(folder)
    components.family.save_components(components, folder)
    return folder
