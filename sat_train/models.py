"""SD v1.5 and SDXL components: load them (from_pretrained) and add the LoRA adapter (peft)."""

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
    # SDXL's pipeline option (the model's model_index.json): an empty negative prompt encodes as zeros
    force_zeros_for_empty_prompt: bool = True

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
    """SD v1.5's folder layout (tokenizer/, text_encoder/, vae/, unet/, scheduler/), or SDXL's: a UNet
    with ``addition_embed_type="text_time"`` and tokenizer_2/ + text_encoder_2/ (CLIPTextModelWithProjection)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = config.pretrained_model_name_or_path
    check_model_source(source)
    common = {"revision": config.revision, "cache_dir": config.cache_dir}
    weights = {"variant": config.variant, **common}
    try:
        components = Components(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
        )
        if is_sdxl_unet(components.unet):  # the UNet says SDXL, for a hub id as for a folder
            components.tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
            components.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", **weights)
            components.force_zeros_for_empty_prompt = read_force_zeros_for_empty_prompt(source, common)
        return components
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        import os

        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") and "connect" in first_line:
            first_line += " [HF_HUB_OFFLINE is set: download the model first or pass a local folder]"
        raise UsageError(f"cannot load Stable Diffusion from {source!r}: {first_line} (expected a hub id or "
                         f"a folder with {subfolder_list(SDXL_SUBFOLDERS)} for SDXL, without the _2 ones for "
                         "SD v1.5)") from err


def read_force_zeros_for_empty_prompt(source: str, common: dict) -> bool:
    """An SDXL model's pipeline option, from its model_index.json (StableDiffusionXLPipeline's default,
    True, when the model has none or it cannot be read)."""
    from diffusers import StableDiffusionXLPipeline

    try:
        index = StableDiffusionXLPipeline.load_config(source, **common)
    except (OSError, ValueError):
        return True
    return bool(index.get("force_zeros_for_empty_prompt", True))


def is_sdxl_unet(unet) -> bool:
    """SDXL's UNet: conditioned on pooled text embeddings and time ids besides the text context."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


MODEL_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def subfolder_list(names) -> str:
    return ", ".join(name + "/" for name in names)


def looks_like_sdxl_folder(path) -> bool:
    """A folder with any of SDXL's second text encoder/tokenizer, or whose model_index.json or UNet
    config says SDXL (checked before loading, to name the subfolders it lacks)."""
    import json

    if (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir():
        return True
    for config_file, key, sdxl_value in (("model_index.json", "_class_name", "StableDiffusionXLPipeline"),
                                         ("unet/config.json", "addition_embed_type", "text_time")):
        try:
            if json.loads((path / config_file).read_text(encoding="utf-8")).get(key) == sdxl_value:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def check_model_source(source: str) -> None:
    """A local folder must have SD v1.5's subfolders, or SDXL's when it looks like SDXL (checked before
    any loading, one clear message); a path-like source that does not exist is not sent to the hub as an
    id. (A single-file SDXL checkpoint is refused by single_file.py: pass the diffusers folder.)"""
    from pathlib import Path

    path = Path(source).expanduser()
    if path.is_dir():
        sdxl = looks_like_sdxl_folder(path)
        expected = SDXL_SUBFOLDERS if sdxl else MODEL_SUBFOLDERS
        missing = [name for name in expected if not (path / name).is_dir()]
        if missing:
            kind = "an SDXL" if sdxl else "a Stable Diffusion v1.5"
            raise UsageError(f"--pretrained_model_name_or_path {source} is not {kind} folder: "
                             f"missing {subfolder_list(missing)} (expected {subfolder_list(expected)})")
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


def vae_dtype(components: Components, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype in training: float32 for an SDXL VAE whose config sets ``force_upcast`` under
    fp16 (the stock SDXL VAE overflows in fp16; diffusers' SDXL example encodes in float32 then), else
    the weights'. SD v1.5's VAE configs lack the key (read as True) but are fine in fp16: unchanged."""
    if components.is_sdxl and weight_dtype == torch.float16 and getattr(components.vae.config, "force_upcast", False):
        return torch.float32
    return weight_dtype


def fp16_vae_warning(components: Components, weight_dtype: torch.dtype) -> str | None:
    """The warning for fp16 with an SDXL VAE that asks to be upcast (None when there is nothing to say)."""
    if vae_dtype(components, weight_dtype) == weight_dtype:
        return None
    return ("warning: --mixed_precision fp16 with an SDXL VAE whose config sets force_upcast (the stock SDXL VAE "
            "overflows in fp16): it encodes in float32, slower and larger; pass --pretrained_vae_model_name_or_path "
            "madebyollin/sdxl-vae-fp16-fix for an fp16-safe one")
