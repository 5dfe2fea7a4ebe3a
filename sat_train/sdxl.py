"""SDXL's conditioning, as diffusers' train_text_to_image_lora_sdxl.py builds it.

- The prompt: both text encoders' penultimate hidden states, concatenated on the feature axis
  (SDXL's cross-attention context, (B, 77, 768 + 1280)), and the second encoder's pooled, projected
  ``text_embeds`` (B, 1280), which the UNet's ``text_time`` embedding reads.
- ``time_ids`` (B, 6): each sample's original size (H, W of the image file), the top-left of its crop
  in the resized image, and its target size (H, W: --resolution, or its aspect-ratio bucket).

Batches of an SDXL run carry ``input_ids_2`` (the caption through the second tokenizer) and the
three sizes as long tensors (B, 2) under SIZE_KEYS; ``train.make_step_inputs`` turns them into the
``added_cond_kwargs`` that every UNet forward of the SAT step receives.
"""

from __future__ import annotations

import torch

SIZE_KEYS = ("original_size", "crop_top_left", "target_size")


def encode_sdxl_prompt(text_encoder, text_encoder_2, input_ids: torch.Tensor, input_ids_2: torch.Tensor,
                       trainable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond (B, 77, D1 + D2), pooled (B, P)); with gradients when ``trainable`` (a text encoder LoRA
    trains) and gradients are on, as text_encoder.encode_captions does."""
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        first = text_encoder(input_ids, output_hidden_states=True)
        second = text_encoder_2(input_ids_2, output_hidden_states=True)
        cond = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return cond, second.text_embeds


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """(B, 6): (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample, from (B, 2) each
    (diffusers' compute_time_ids, with each sample's own sizes)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=-1)


def size_conditioning(image_size: tuple[int, int], crop_box: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
    """SIZE_KEYS of one sample as long tensors (2,), (H, W) / (top, left) order, from the image's
    (W, H) ``image_size`` and the (left, top, right, bottom) ``crop_box`` of ImageTransform.crop_box."""
    (width, height), (left, top, right, bottom) = image_size, crop_box
    values = {"original_size": (height, width), "crop_top_left": (top, left),
              "target_size": (bottom - top, right - left)}
    return {key: torch.tensor(value, dtype=torch.long) for key, value in values.items()}


def added_cond_kwargs(batch: dict, pooled: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet's ``added_cond_kwargs`` of a batch: pooled text embeddings and time ids, in ``dtype``
    (the UNet weights'), on the pooled embeddings' device."""
    ids = time_ids(*(batch[key] for key in SIZE_KEYS))
    return {"text_embeds": pooled.to(dtype), "time_ids": ids.to(pooled.device, dtype)}
