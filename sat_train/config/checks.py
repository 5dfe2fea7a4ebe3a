"""Every check of a TrainConfig that needs no model and no data, in one ordered list.

Each check lives beside the code it guards (the feature owns its flags); this list only decides the
order, which decides the error a user sees first. ``TrainConfig.validate`` runs it.
"""

from __future__ import annotations

from ..data.buckets import check_resolution_flags
from ..data.dataset import check_caption_flags
from ..data.latent_cache import check_latent_cache_flags
from ..data.masks import check_mask_flags
from ..data.records import check_dataset_flags
from ..data.regularization import check_regularization_flags
from ..demo import check_demo_flag
from ..errors import UsageError
from ..evaluate.training_metrics import check_sample_metrics_flags
from ..guide.settings import (check_attention_flags, check_blur_flags, check_cac_words_flag, check_guide_mode_flags,
                              check_latents_fit_the_blur, check_loss_flags, check_sac_layer_flag)
from ..models.lora import check_lora_flags
from ..models.single_file import check_model_flags
from ..outputs.pictures import check_mask_preview_flags
from ..outputs.sample_prompts import check_sample_flags
from ..run.face_masks import check_face_mask_flags
from ..run.inputs import check_noise_flags
from ..run.optimizers import check_optimizer_flags, check_text_encoder_flags
from ..run.prepare import check_compile_flags, check_mixed_precision_flag


def check_model_given(config) -> None:
    if config.pretrained_model_name_or_path is None and not config.is_demo:
        raise UsageError("--pretrained_model_name_or_path is required with your own data "
                         "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5); leave out both for the demo")


def check_counts(config) -> None:
    """Counts of batches, steps and images are >= 1 (the optional ones when given)."""
    for name in ("train_batch_size", "gradient_accumulation_steps", "rank",
                 "checkpointing_steps", "num_train_epochs", "validation_epochs"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(config, name)}")
    for name in ("validation_steps", "mask_preview_steps"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(config, name)}")


def check_max_train_steps(config) -> None:
    if config.max_train_steps is not None and config.max_train_steps < 1:
        raise UsageError(f"--max_train_steps must be >= 1, got {config.max_train_steps}")


CHECKS = (
    check_model_given,
    check_resolution_flags,
    check_counts,
    check_mask_preview_flags,
    check_guide_mode_flags,
    check_dataset_flags,
    check_regularization_flags,
    check_model_flags,  # single-file checkpoints, --vae, --tokenizer_name
    check_demo_flag,
    check_sac_layer_flag,
    check_caption_flags,
    check_latent_cache_flags,
    check_mask_flags,
    check_face_mask_flags,
    check_lora_flags,
    check_text_encoder_flags,
    check_optimizer_flags,
    check_loss_flags,
    check_noise_flags,
    check_compile_flags,
    check_sample_flags,
    check_sample_metrics_flags,
    check_cac_words_flag,
    check_max_train_steps,
    check_blur_flags,
    check_latents_fit_the_blur,
    check_mixed_precision_flag,
    check_attention_flags,
)


def check_config(config) -> None:
    for check in CHECKS:
        check(config)
