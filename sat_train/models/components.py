"""Components: the parts of one Stable Diffusion model, and its family (models/family.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .family import SD15, family_of


@dataclass
class Components:
    """Everything a Stable Diffusion training run needs: SD v1.5's five parts, and for SDXL its second
    tokenizer and text encoder (CLIPTextModelWithProjection, whose pooled output conditions the UNet).
    ``family`` is decided once, from the UNet's config, when the components are put together."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    # SDXL's pipeline option (the model's model_index.json): an empty negative prompt encodes as zeros
    force_zeros_for_empty_prompt: bool = True
    family: SD15 = field(init=False)

    def __post_init__(self):
        self.family = family_of(self.unet)

    @property
    def tokenizers(self) -> list:
        return self.family.tokenizers(self)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self.family.text_encoders(self)

    @property
    def default_image_side(self) -> int:
        """The image side the pipelines sample when none is given: the UNet's sample_size (latents) times
        the VAE's downscale (SD v1.5: 512 px, SDXL: 1024 px)."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self, scheduler=None, force_zeros_for_empty_prompt: bool | None = None):
        """diffusers' text-to-image pipeline of these parts (the family's: StableDiffusionPipeline without
        the safety checker, StableDiffusionXLPipeline without the watermark), with ``scheduler`` (default:
        the training scheduler) and the model's force_zeros_for_empty_prompt unless told."""
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = self.force_zeros_for_empty_prompt
        pipeline = self.family.pipeline(self, scheduler or self.noise_scheduler, force_zeros_for_empty_prompt)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline
