"""What differs between the model families sat trains (SD v1.5, SDXL), one object per family.

A family is decided once, from the UNet's config (``family_of``), and travels on the components
(``Components.family``); nothing else in sat_train branches on the family. It owns:

- the text side: which tokenizers and text encoders the model has, a caption's per-sample inputs,
  a batch's encoding into the cross-attention context plus the UNet's ``added_cond_kwargs``, the
  image's size conditioning, and which text-encoder layers get a LoRA;
- the files: the diffusers pipeline (sampling, the folder layout) and its LoRA loader (LoRA files),
  the kohya key names and the family's names in the kohya/ModelSpec metadata;
- the rules: the VAE's dtype under fp16, what a CAC caption must satisfy.

SDXL's conditioning is diffusers' train_text_to_image_lora_sdxl.py's: both text encoders'
penultimate hidden states concatenated (the context, (B, 77, 768 + 1280)), the second encoder's
pooled, projected ``text_embeds`` (B, 1280), and ``time_ids`` (B, 6) from each sample's original
size (H, W of the image file), the top-left of its crop in the resized image and its target size
(H, W: --resolution, or its bucket). Batches of an SDXL run carry ``input_ids_2`` and those sizes
under SIZE_KEYS. A third family (SD 2.x, say) is one more class here and one line in FAMILIES.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import UsageError
from .lora import add_text_encoder_lora
from .words import word_token_ids, word_token_positions

SIZE_KEYS = ("original_size", "crop_top_left", "target_size")
# transformers' notice (logger transformers.utils.import_utils) on first access to an image processor
# of its torchvision backend where torchvision is missing, e.g. "`CLIPImageProcessor` requires torchvision
# (not installed); falling back to `CLIPImageProcessorPil` for backward compatibility. ..."
TORCHVISION_FALLBACK_NOTICE = "ImageProcessor` requires torchvision (not installed); falling back to `"


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(len(captions), model_max_length) token ids, padded and truncated as the text encoder reads them."""
    return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                     truncation=True, return_tensors="pt").input_ids


def _encoding(trainable: bool):
    """Text encoding with gradients when a text encoder LoRA trains (and gradients are on)."""
    return torch.set_grad_enabled(trainable and torch.is_grad_enabled())


class SD15:
    """Stable Diffusion v1.5: one CLIP text encoder whose last hidden states are the context."""

    name = "sd15"
    a_title = "a Stable Diffusion v1.5"  # for messages
    subfolders = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    text_parts = (("tokenizer", "text_encoder"),)  # Components fields: a (tokenizer, text encoder) pair each
    input_keys = ("input_ids",)  # a sample's token ids (batch keys), one per tokenizer
    # LoRA files: diffusers' key prefix and kohya's, one per text encoder (sd-scripts' names)
    lora_file_prefixes = ("text_encoder.",)
    kohya_text_prefixes = ("lora_te_",)
    # sd-scripts' names for the family in a LoRA's metadata (train_network.py, library/sai_model_spec.py)
    kohya_base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    modelspec_implementation = "diffusers"

    @staticmethod
    def matches_unet(unet_config) -> bool:
        return True  # the fallback: any UNet the others do not claim

    @staticmethod
    def looks_like_folder(path: Path) -> bool:
        return True

    # ------------------------------------------------------------------ the text side

    def tokenizers(self, components) -> list:
        return [getattr(components, tok) for tok, _ in self.text_parts]

    def text_encoders(self, components) -> list:
        return [getattr(components, enc) for _, enc in self.text_parts]

    def caption_inputs(self, tokenizers, caption: str) -> dict[str, torch.Tensor]:
        """One sample's token ids (``input_keys``), from the caption as the text encoders see it."""
        pairs = zip(self.input_keys, tokenizers, strict=True)
        return {key: tokenize(tokenizer, [caption])[0] for key, tokenizer in pairs}

    def image_conditioning(self, image_size: tuple[int, int], crop_box: tuple[int, int, int, int]) -> dict:
        """One sample's conditioning on its image's sizes (SDXL's; none here)."""
        return {}

    def encode_batch(self, text_encoders, batch: dict, dtype: torch.dtype, trainable: bool):
        """(cond (B, S, D), added_cond_kwargs or None) of a batch; with gradients when ``trainable``."""
        with _encoding(trainable):
            return text_encoders[0](batch["input_ids"], return_dict=False)[0], None

    def prompt_conditioning(self, components, prompt: str, negative_prompt: str, num_images: int, cfg: bool,
                            device, dtype, size: tuple[int, int], force_zeros_for_empty_prompt: bool):
        """The UNet's keyword arguments for sampling: (prompt half, negative half or None without CFG).
        The text encoder's last hidden states; the negative prompt ("" too) is encoded, as in
        diffusers' SAG pipeline. ``size`` and ``force_zeros_for_empty_prompt`` are SDXL's only."""
        def half(text: str) -> dict:
            ids = tokenize(components.tokenizer, [text] * num_images).to(device)
            return {"encoder_hidden_states": components.text_encoder(ids, return_dict=False)[0].to(dtype)}

        return half(prompt), half(negative_prompt) if cfg else None

    def add_text_encoder_loras(self, components, rank: int, alpha: float | None, dropout: float) -> None:
        """--train_text_encoder's adapter on every text encoder layer."""
        add_text_encoder_lora(components.text_encoder, rank, alpha, dropout)

    def check_caption_words(self, tokenizers, words: list[str], records, names) -> None:
        """What CAC needs of the captions beyond finding the words (SDXL's tokenizers must agree)."""

    # ------------------------------------------------------------------ files and rules

    def pipeline_class(self):
        quiet_torchvision_fallback()
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def lora_loader_class(self):
        """diffusers' LoRA loader mixin whose save_lora_weights / lora_state_dict handle the family's files:
        the classmethods the pipeline inherits, without importing the pipeline modules."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin

    def pipeline(self, components, scheduler, force_zeros_for_empty_prompt: bool):
        """diffusers' text-to-image pipeline of ``components``, without the safety checker."""
        return self.pipeline_class()(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
            unet=components.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    def save_components(self, components, folder: Path) -> None:
        """The diffusers folder layout of the parts (what --pretrained_model_name_or_path reads)."""
        for name in ("tokenizer", "text_encoder", "vae", "unet"):
            getattr(components, name).save_pretrained(folder / name)
        components.noise_scheduler.save_pretrained(folder / "scheduler")

    def load_extra_parts(self, source: str, common: dict, weights: dict) -> dict:
        """Components fields a folder or hub id holds beyond SD v1.5's five."""
        return {}

    def kohya_unet_blocks(self, unet_config) -> dict[str, str] | None:
        """diffusers block name → kohya's, where the kohya file names the UNet's modules otherwise."""
        return None

    def vae_dtype(self, vae, weight_dtype: torch.dtype) -> torch.dtype:
        """The VAE's dtype in training (SD v1.5's VAE is fine in fp16; its configs lack force_upcast)."""
        return weight_dtype


class SDXL(SD15):
    """Stable Diffusion XL: two CLIP text encoders (the second with a projection) and text_time
    conditioning (pooled text embeddings and time ids)."""

    name = "sdxl"
    a_title = "an SDXL"
    subfolders = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    text_parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    input_keys = ("input_ids", "input_ids_2")
    lora_file_prefixes = ("text_encoder.", "text_encoder_2.")
    kohya_text_prefixes = ("lora_te1_", "lora_te2_")
    kohya_base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"

    @staticmethod
    def matches_unet(unet_config) -> bool:
        """SDXL's UNet: conditioned on pooled text embeddings and time ids besides the text context."""
        return getattr(unet_config, "addition_embed_type", None) == "text_time"

    @staticmethod
    def looks_like_folder(path: Path) -> bool:
        """A folder with any of SDXL's second text encoder/tokenizer, or whose model_index.json or UNet
        config says SDXL (checked before loading, to name the subfolders it lacks)."""
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

    def image_conditioning(self, image_size: tuple[int, int], crop_box: tuple[int, int, int, int]) -> dict:
        """SIZE_KEYS of one sample as long tensors (2,), (H, W) / (top, left) order, from the image's
        (W, H) ``image_size`` and the (left, top, right, bottom) ``crop_box`` of ImageTransform.crop_box."""
        (width, height), (left, top, right, bottom) = image_size, crop_box
        values = {"original_size": (height, width), "crop_top_left": (top, left),
                  "target_size": (bottom - top, right - left)}
        return {key: torch.tensor(value, dtype=torch.long) for key, value in values.items()}

    def encode_batch(self, text_encoders, batch: dict, dtype: torch.dtype, trainable: bool):
        """(cond (B, 77, D1 + D2), {"text_embeds": pooled (B, P), "time_ids": (B, 6)}) in ``dtype``, on
        the pooled embeddings' device."""
        cond, pooled = encode_prompt(*text_encoders, batch["input_ids"], batch["input_ids_2"], trainable)
        ids = time_ids(*(batch[key] for key in SIZE_KEYS))
        return cond, {"text_embeds": pooled.to(dtype), "time_ids": ids.to(pooled.device, dtype)}

    def prompt_conditioning(self, components, prompt: str, negative_prompt: str, num_images: int, cfg: bool,
                            device, dtype, size: tuple[int, int], force_zeros_for_empty_prompt: bool):
        """As ``StableDiffusionXLPipeline.__call__`` conditions its UNet: ``encode_prompt`` (both
        encoders; an empty negative prompt gives zeros when ``force_zeros_for_empty_prompt``), time
        ids for original = target = ``size`` (height, width), crop (0, 0), the same for both halves."""
        pipeline = self.pipeline(components, components.noise_scheduler, force_zeros_for_empty_prompt)
        embeds, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(
            prompt, device=device, num_images_per_prompt=num_images, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt or None)
        # the pipeline's own time-id builder (it also checks them against the UNet's add_embedding)
        ids = pipeline._get_add_time_ids(tuple(size), (0, 0), tuple(size), dtype=embeds.dtype,
                                         text_encoder_projection_dim=components.text_encoder_2.config.projection_dim)
        ids = ids.to(device, dtype).repeat(num_images, 1)

        def half(hidden_states: torch.Tensor, text_embeds: torch.Tensor) -> dict:
            return {"encoder_hidden_states": hidden_states.to(dtype),
                    "added_cond_kwargs": {"text_embeds": text_embeds.to(dtype), "time_ids": ids}}

        return half(embeds, pooled), half(negative_embeds, negative_pooled) if cfg else None

    def add_text_encoder_loras(self, components, rank: int, alpha: float | None, dropout: float) -> None:
        """Both encoders' adapters. SDXL reads the first encoder's penultimate hidden states (diffusers'
        pipeline and train_text_to_image_lora_sdxl, sd-scripts), so its last layer gets no LoRA: one
        there would never get a gradient (and DDP stops on parameters without one). The second's last
        layer feeds the pooled embedding: it keeps its LoRA."""
        first = components.text_encoder
        add_text_encoder_lora(first, rank, alpha, dropout, read_layers=first.config.num_hidden_layers - 1)
        add_text_encoder_lora(components.text_encoder_2, rank, alpha, dropout)

    def check_caption_words(self, tokenizers, words: list[str], records, names) -> None:
        """CAC reads positions from the first tokenizer's ids; the UNet's context at a position is both
        encoders' states there, so the second tokenizer must put the chosen words at the same positions
        (SDXL's two CLIP tokenizers share the vocabulary and differ only in padding). Checked for every
        caption before training: a pair that disagrees would blur where other words attend."""
        pairs = [(tokenizer, word_token_ids(tokenizer, words)) for tokenizer in tokenizers]
        for index, (_, captions) in enumerate(records):
            for caption in (captions,) if isinstance(captions, str) else captions:
                first, second = (word_token_positions(tok, tokenize(tok, [caption])[0], ids) for tok, ids in pairs)
                if first != second:
                    raise UsageError(f"--guide cac: the caption of {names[index]} puts --cac_words at positions "
                                     f"{first} for tokenizer/ but {second} for tokenizer_2/: SDXL's two tokenizers "
                                     "must split captions alike; use the model's own tokenizers, or --guide sac")

    def pipeline_class(self):
        quiet_torchvision_fallback()
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def lora_loader_class(self):
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin  # knows text_encoder_2

        return StableDiffusionXLLoraLoaderMixin

    def pipeline(self, components, scheduler, force_zeros_for_empty_prompt: bool):
        """diffusers' SDXL pipeline of ``components``, without the invisible watermark."""
        return self.pipeline_class()(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
            scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)

    def save_components(self, components, folder: Path) -> None:
        """SDXL's layout with model_index.json (StableDiffusionXLPipeline.from_pretrained reads it)."""
        self.pipeline_class()(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
            scheduler=components.noise_scheduler).save_pretrained(folder)

    def load_extra_parts(self, source: str, common: dict, weights: dict) -> dict:
        """The second tokenizer and text encoder (CLIPTextModelWithProjection) and the model's
        force_zeros_for_empty_prompt."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return {"tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                                              **weights),
                "force_zeros_for_empty_prompt": self.read_force_zeros_for_empty_prompt(source, common)}

    def read_force_zeros_for_empty_prompt(self, source: str, common: dict) -> bool:
        """The model's pipeline option, from its model_index.json (the pipeline's default, True, when the
        model has none or it cannot be read)."""
        try:
            index = self.pipeline_class().load_config(source, **common)
        except (OSError, ValueError):
            return True
        return bool(index.get("force_zeros_for_empty_prompt", True))

    def kohya_unet_blocks(self, unet_config) -> dict[str, str]:
        return sgm_block_names(unet_config)

    def vae_dtype(self, vae, weight_dtype: torch.dtype) -> torch.dtype:
        """float32 for a VAE whose config sets ``force_upcast`` under fp16 (the stock SDXL VAE overflows in
        fp16; diffusers' SDXL example encodes in float32 then), else the weights'."""
        if weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            return torch.float32
        return weight_dtype


FAMILIES = (SDXL(), SD15())  # most specific first: SD15 claims any UNet (and folder) the others do not


def family_of(unet) -> SD15:
    """The family of a UNet, from its config."""
    return next(family for family in FAMILIES if family.matches_unet(unet.config))


def family_of_folder(path: Path) -> SD15:
    """The family a model folder looks like before anything loads (to name the subfolders it lacks)."""
    return next(family for family in FAMILIES if family.looks_like_folder(path))


def _not_torchvision_fallback(record: logging.LogRecord) -> bool:
    return TORCHVISION_FALLBACK_NOTICE not in record.getMessage()


def quiet_torchvision_fallback() -> None:
    """Drops transformers' torchvision fallback notices (TORCHVISION_FALLBACK_NOTICE), which importing
    diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline logs (for CLIPImageProcessor, and
    SiglipImageProcessor via diffusers.loaders.ip_adapter) where torchvision is not installed: those image
    processors serve the safety checker and IP-Adapter, which sat never uses, and sat does not depend on
    torchvision. Every other record of that logger, and every other warning, still shows. Called before
    each pipeline import; idempotent."""
    logger = logging.getLogger("transformers.utils.import_utils")  # transformers' get_logger(__name__)
    if _not_torchvision_fallback not in logger.filters:
        logger.addFilter(_not_torchvision_fallback)


def encode_prompt(text_encoder, text_encoder_2, input_ids: torch.Tensor, input_ids_2: torch.Tensor,
                  trainable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's (cond (B, 77, D1 + D2), pooled (B, P)); with gradients when ``trainable``."""
    with _encoding(trainable):
        first = text_encoder(input_ids, output_hidden_states=True)
        second = text_encoder_2(input_ids_2, output_hidden_states=True)
        cond = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return cond, second.text_embeds


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """(B, 6): (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample, from (B, 2) each
    (diffusers' compute_time_ids, with each sample's own sizes)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=-1)


def sgm_block_names(config) -> dict[str, str]:
    """kohya's SDXL names of the UNet's attention blocks: diffusers' block (underscored, as
    convert_state_dict_to_kohya writes it) → the original SGM UNet's, whose module names sd-scripts'
    sdxl_train_network trains on (library/sdxl_original_unet.py) and ComfyUI's LoRA key map reads
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``). SGM numbers blocks in order:
    input_blocks[0] is conv_in, then each level's layers [resnet, attention] and, but after the last
    level, its downsampler; middle_block is [resnet, attention, resnet]; output_blocks has
    layers_per_block + 1 layers per level [resnet, attention, upsampler]. Derived from ``config``,
    so any number of levels and layers maps (the tiny test model's too)."""
    levels = len(config.block_out_channels)
    layers = config.layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * levels
    names = {"mid_block_attentions_0_": "middle_block_1_"}
    index = 1
    for level in range(levels):
        for j in range(layers[level]):
            names[f"down_blocks_{level}_attentions_{j}_"] = f"input_blocks_{index}_1_"
            index += 1
        index += level < levels - 1  # the downsampler's block
    index = 0
    for level, count in enumerate(reversed(layers)):  # up_blocks[0] is the lowest resolution
        for j in range(count + 1):
            names[f"up_blocks_{level}_attentions_{j}_"] = f"output_blocks_{index}_1_"
            index += 1
    return names
