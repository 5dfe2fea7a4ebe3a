"""The writing side of exported LoRA files: --save_precision, the kohya file's metadata (kohya-ss/
sd-scripts' ``ss_*`` training keys, its ``sshs_*`` hashes, Stability's ``modelspec.*`` keys, SAT's
``sat_*`` settings); files are written by faults.write_atomically.

Value formats follow sd-scripts (train_network.py, library/train_util.py, library/sai_model_spec.py):
every value is a string, ``ss_*`` values are Python's ``str()`` of the setting (``"4"``, ``"8.0"``,
``"None"``, ``"(512, 512)"``), and the hashes are those sd-webui-additional-networks indexes by.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from pathlib import Path

MODELSPEC_VERSION = "1.0.1"  # what sd-scripts writes since its ModelSpec 1.0.1 update (Aug 2025)
SAVE_PRECISIONS = ("float", "fp16", "bf16")  # --save_precision, kohya's names
LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000  # sd-scripts' addnet_hash_legacy window


def precision_dtype(precision: str):
    """--save_precision → the torch dtype of exported tensors (None for float: saved as trained)."""
    import torch

    return {"float": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def cast_state_dict(state: dict, precision: str) -> dict:
    """Floating tensors cast to --save_precision (sd-scripts casts every tensor, ``.alpha`` included)."""
    dtype = precision_dtype(precision)
    if dtype is None:
        return state
    return {k: v.detach().to(dtype).contiguous() if v.is_floating_point() else v for k, v in state.items()}


def precision_overflow(state: dict, precision: str) -> str | None:
    """The first tensor whose values exceed --save_precision's range (they would turn into inf),
    described for the error message; None when every tensor fits."""
    import torch

    dtype = precision_dtype(precision)
    if dtype is None:
        return None
    limit = torch.finfo(dtype).max
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel():
            peak = tensor.detach().abs().max().item()
            if peak > limit:
                return f"{name} has values up to {peak:.6g}, beyond {precision}'s largest {limit:.6g}"
    return None


def safetensors_hashes(state: dict, metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' ``precalculate_safetensors_hashes``: the file serialized with only its ``ss_*``
    metadata (the training keys, which never change afterwards), then the sha256 of everything after
    the header (``sshs_model_hash``) and the first 8 hex digits of the sha256 of the 64 KiB at 1 MiB
    (``sshs_legacy_hash``)."""
    from safetensors.torch import save

    data = save(state, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_end = 8 + int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[header_end:]).hexdigest()
    legacy_hash = hashlib.sha256(data[LEGACY_HASH_OFFSET:LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def kohya_training_metadata(config, steps: int, epoch: int, max_train_steps: int, family) -> dict[str, str]:
    """The ``ss_*`` keys sd-scripts' train_network.py writes that this trainer has an equivalent of
    (``max_train_steps``: the run's length, also when --num_train_epochs set it; ``family``: the model's,
    whose names sd-scripts writes, models/family.py)."""
    from ..data.masks import masks_on  # here: the flags (config/settings.py) import this module without torch

    model = config.pretrained_model_name_or_path
    values = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": config.rank,
        "ss_network_alpha": config.resolved_lora_alpha,
        "ss_network_dropout": config.lora_dropout,
        "ss_base_model_version": family.kohya_base_model_version,
        "ss_v2": False,
        "ss_resolution": tuple(config.resolution_wh),
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_max_train_steps": max_train_steps,
        "ss_output_name": Path(config.output_dir).name,
        "ss_training_comment": config.training_comment,
        "ss_learning_rate": config.learning_rate,
        "ss_text_encoder_lr": config.text_encoder_lr,  # the flag, "None" when unset (sd-scripts alike)
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_optimizer": config.optimizer_name + (f"({','.join(config.optimizer_args)})" if config.optimizer_args
                                                 else ""),
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_batch_size_per_device": config.train_batch_size,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_mixed_precision": config.mixed_precision or "no",
        "ss_seed": config.seed,
        "ss_noise_offset": config.noise_offset,
        "ss_min_snr_gamma": config.snr_gamma,
        "ss_multires_noise_iterations": config.multires_noise_iterations,
        "ss_multires_noise_discount": config.multires_noise_discount,
        "ss_ip_noise_gamma": config.ip_noise_gamma,
        "ss_debiased_estimation": config.debiased_estimation_loss,
        "ss_loss_type": config.loss_type,
        "ss_huber_schedule": config.huber_schedule,
        "ss_huber_scale": config.huber_scale,
        "ss_huber_c": config.huber_c,
        "ss_caption_dropout_rate": config.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": config.caption_tag_dropout_rate,
        "ss_shuffle_caption": config.shuffle_caption,
        "ss_keep_tokens": config.keep_tokens,
        "ss_flip_aug": config.random_flip,
        "ss_enable_bucket": config.enable_bucket,
        "ss_min_bucket_reso": config.min_bucket_reso,
        "ss_max_bucket_reso": config.max_bucket_reso,
        "ss_bucket_no_upscale": config.bucket_no_upscale,
        # sd-scripts' train_network.py writes neither flag (checked Feb 2026); named as its ss_* keys are
        "ss_masked_loss": masks_on(config),
        "ss_alpha_mask": config.alpha_mask,
    }
    if model is not None:  # sd-scripts: a local model's folder name, else the hub id
        values["ss_sd_model_name"] = _model_name(model)
    if config.vae is not None:  # sd-scripts writes --vae's name the same way
        values["ss_vae_name"] = _model_name(config.vae)
    return {k: str(v) for k, v in values.items()}


def _model_name(model: str) -> str:
    """A local model's file or folder name, else the hub id as given."""
    return os.path.basename(model.rstrip("/\\")) if os.path.exists(model) else model


def modelspec_metadata(config, prediction_type: str, timestamp: float, family) -> dict[str, str]:
    """Stability's ModelSpec keys as sd-scripts fills them for a LoRA of ``family`` (title:
    kohya's --output_name, here the output folder's name; date: ISO 8601 local time, whole seconds)."""
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.implementation_version": f"sat_train/{_package_version()}",
        "modelspec.title": Path(config.output_dir).name,
        "modelspec.resolution": "{}x{}".format(*config.resolution_wh),
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sat")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def sat_metadata(config) -> dict[str, str]:
    """SAT's own settings, so a file says how it was guided (also what the kohya launcher adds to their file)."""
    settings = config.guide_settings
    values = {"sat_guide": config.guide, "sat_guide_ratio": settings.ratio, "sat_guide_threshold": settings.threshold,
              "sat_guide_kernel_size": settings.kernel_size, "sat_guide_sigma": settings.sigma,
              "sat_guide_capture": settings.capture, "sat_guide_detach_degraded": settings.detach_degraded}
    if config.guide == "cac":
        values["sat_cac_words"] = config.cac_words
    return {k: str(v) for k, v in values.items()}


def mask_metadata(config) -> dict[str, str]:
    """sat's loss-mask settings (data/masks.py), when the run masks its loss."""
    from ..data.masks import masks_on

    if not masks_on(config):
        return {}
    values = dict(sat_unmasked_weight=config.unmasked_weight,
                  sat_normalize_masked_area_loss=config.normalize_masked_area_loss,
                  sat_face_masks=config.face_masks, sat_guide_within_mask=config.guide_within_mask)
    if config.face_masks:
        values["sat_face_mask_margin"] = config.face_mask_margin
    return {k: str(v) for k, v in values.items()}


def kohya_file_metadata(state: dict, config, steps: int, epoch: int, max_train_steps: int,
                        family, prediction_type: str = "epsilon", data_keys: dict[str, str] | None = None
                        ) -> dict[str, str]:
    """Everything the kohya file's header carries; ``state`` is the state dict as it will be saved
    (after --save_precision), which the hashes cover; ``family``: the model's (its names); ``data_keys``: what
    only the data knows (regularization images: data/regularization.reg_metadata)."""
    metadata = {"format": "pt", **kohya_training_metadata(config, steps, epoch, max_train_steps, family),
                **(data_keys or {}), **modelspec_metadata(config, prediction_type, time.time(), family),
                **sat_metadata(config), **mask_metadata(config)}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(state, metadata)
    return metadata
