"""SD v1.5 components: load them (from_pretrained) and add the LoRA adapter (peft)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig, UsageError

# The attention projections LoRA trains, as in diffusers' train_text_to_image_lora.py.
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class Components:
    """Everything a Stable Diffusion training run needs: SD v1.5's five parts, and for SDXL its second
    tokenizer and text encoder (CLIPTextModelWithProjection, whose pooled output conditions the UNet)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def load_components(config: TrainConfig) -> Components:
    """A single-file checkpoint (sat_train.single_file) or a diffusers folder / hub id; --vae and
    --tokenizer_name replace those components."""
    from . import single_file

    if single_file.is_checkpoint_path(config.pretrained_model_name_or_path):
        return single_file.load_single_file_components(config)
    components = load_folder_components(config)
    if config.vae is not None:
        components.vae = single_file.load_vae(config)
    if config.tokenizer_name is not None:
        components.tokenizer = single_file.load_tokenizer(config)
    return components


def load_folder_components(config: TrainConfig) -> Components:
    """The SD v1.5 folder layout: tokenizer/, text_encoder/, vae/, unet/, scheduler/."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = config.pretrained_model_name_or_path
    check_model_source(source)
    common = {"revision": config.revision, "cache_dir": config.cache_dir}
    try:
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=config.variant,
                                                       **common),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", variant=config.variant, **common),
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=config.variant, **common),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        import os

        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") and "connect" in first_line:
            first_line += " [HF_HUB_OFFLINE is set: download the model first or pass a local folder]"
        raise UsageError(f"cannot load Stable Diffusion from {source!r}: {first_line} (expected a hub id or "
                         "a folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/)") from err


MODEL_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_model_source(source: str) -> None:
    """A local folder must have SD v1.5's subfolders (checked before any loading, one clear message);
    a path-like source that does not exist is not sent to the hub as an id."""
    from pathlib import Path

    path = Path(source).expanduser()
    if path.is_dir():
        missing = [name for name in MODEL_SUBFOLDERS if not (path / name).is_dir()]
        if missing:
            raise UsageError(f"--pretrained_model_name_or_path {source} is not a Stable Diffusion v1.5 folder: "
                             f"missing {', '.join(m + '/' for m in missing)} (expected "
                             f"{', '.join(m + '/' for m in MODEL_SUBFOLDERS)})")
    elif path.exists():
        raise UsageError(f"--pretrained_model_name_or_path {source} is a file but not a checkpoint; pass a "
                         ".safetensors checkpoint, a folder or a hub id")
    elif source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise UsageError(f"--pretrained_model_name_or_path {source}: no such folder (and not a hub id like "
                         "stable-diffusion-v1-5/stable-diffusion-v1-5)")


def add_lora(unet: torch.nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
    """Adds a trainable LoRA (B = 0 so the model starts unchanged) to the attention projections; each
    projection becomes W x + (alpha / rank) B A dropout(x), with alpha = rank when it is None."""
    unet.add_adapter(lora_config(rank, alpha, dropout, LORA_TARGET_MODULES))


def lora_config(rank: int, alpha: float | None, dropout: float, target_modules: list[str]):
    """peft's LoraConfig of every adapter sat_train trains (the UNet's, the text encoder's)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                      init_lora_weights="gaussian", target_modules=target_modules)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
