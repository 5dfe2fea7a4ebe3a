"""--train_text_encoder: a LoRA on the CLIP text encoder, trained alongside the UNet's.

The adapter sits on each encoder layer's attention (q/k/v/out_proj, as diffusers'
train_dreambooth_lora) and MLP (fc1/fc2, as kohya's sd-scripts) projections, with the UNet's rank,
alpha and dropout. The caption embeddings ``cond`` then carry gradients, and every UNet forward of a
guide that reads ``cond`` (SAT's two) sends its part back to the text encoder. ``--guide_capture
separate``'s extra no-gradient capture forward reads the same ``cond``: only the UNet's LoRA is off
there (``capture.lora_disabled(unet)``), so the map is taken for the captions as this run encodes
them, at no second text encoding (the original CAC code had no text-encoder LoRA to follow).

Files: the text encoder's LoRA goes into the same file as the UNet's (diffusers: ``text_encoder.*``
keys and their adapter metadata; kohya: ``lora_te_*``), keyed by SD v1.5's CLIPTextModel names
(``text_model.encoder.layers.N...``). Recent transformers flatten CLIPTextModel (no ``text_model``
level); diffusers' loader strips the prefix again for such models, and A1111/ComfyUI expect it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import TrainConfig, UsageError

# The CLIP encoder layer's projections the LoRA trains: self-attention, then the MLP.
TEXT_ENCODER_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FILE_PREFIX = "text_encoder."  # diffusers' name for the text encoder's keys in a LoRA file
KOHYA_PREFIX = "lora_te_"  # kohya's, for SD v1.5's one text encoder (SDXL's are lora_te1_ / lora_te2_)


def check_text_encoder_flags(config: TrainConfig) -> None:
    """--text_encoder_lr only means something with --train_text_encoder, and must be a positive number."""
    if config.text_encoder_lr is None:
        return
    if not config.train_text_encoder:
        raise UsageError("--text_encoder_lr sets the text encoder LoRA's learning rate: add --train_text_encoder, "
                         "or drop --text_encoder_lr")
    if not 0.0 < config.text_encoder_lr < float("inf"):  # also rejects nan
        raise UsageError(f"--text_encoder_lr must be > 0, got {config.text_encoder_lr}; leave it out to use "
                         "--learning_rate")


def text_encoder_learning_rate(config: TrainConfig) -> float:
    """--text_encoder_lr, or the UNet's --learning_rate when it is unset."""
    return config.learning_rate if config.text_encoder_lr is None else config.text_encoder_lr


def add_text_encoder_lora(text_encoder: torch.nn.Module, rank: int, alpha: float | None = None,
                          dropout: float = 0.0) -> None:
    """The "default" LoRA adapter on the text encoder (B = 0: it starts unchanged), injected with peft
    directly (transformers' own add_adapter insists on a newer peft than diffusers needs)."""
    from peft import inject_adapter_in_model

    from .models import lora_config

    inject_adapter_in_model(lora_config(rank, alpha, dropout, TEXT_ENCODER_LORA_TARGET_MODULES), text_encoder,
                            adapter_name="default")


def enable_text_encoder_checkpointing(text_encoder: torch.nn.Module) -> None:
    """--gradient_checkpointing for the text encoder. Non-reentrant: the reentrant kind would cut the
    LoRA's gradients, since the frozen embeddings feeding the first layer need no gradient."""
    kwargs = {"use_reentrant": False}
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # the name since transformers 5.x
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def encode_captions(text_encoder: torch.nn.Module, input_ids: torch.Tensor, trainable: bool) -> torch.Tensor:
    """The caption embeddings ``cond`` (B, S, D): with gradients when the text encoder's LoRA trains."""
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        return text_encoder(input_ids, return_dict=False)[0]


def optimizer_param_groups(config: TrainConfig, unet_params, text_encoder_params, lr_scale: float = 1.0) -> list:
    """The optimizer's groups: the UNet's LoRA at --learning_rate, the text encoder's (when it trains) at
    --text_encoder_lr; ``lr_scale`` (--scale_lr) multiplies both. The lr schedule scales every group."""
    groups = [{"params": list(unet_params), "lr": config.learning_rate * lr_scale}]
    if text_encoder_params:
        groups.append({"params": list(text_encoder_params), "lr": text_encoder_learning_rate(config) * lr_scale})
    return groups


# ----------------------------------------------------------------------------- files


def _canonical_prefix(text_encoder) -> str:
    """"text_model." where the model is flattened (recent transformers), so keys read as SD v1.5's."""
    return "" if hasattr(text_encoder, "text_model") else "text_model."


def text_encoder_lora_state_dict(text_encoder) -> dict:
    """The text encoder's LoRA in diffusers' keys (as diffusers' train_dreambooth_lora saves it)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    prefix = _canonical_prefix(text_encoder)
    return convert_state_dict_to_diffusers({prefix + k: v for k, v in get_peft_model_state_dict(text_encoder).items()})


def text_encoder_save_kwargs(text_encoder, precision: str = "float") -> dict:
    """What ``StableDiffusionPipeline.save_lora_weights`` takes for the text encoder (nothing when it
    does not train): its LoRA (in --save_precision ``precision``) and its peft LoraConfig, from which
    ``load_lora_weights`` builds the adapter (so alpha / rank survives)."""
    from .lora_files import cast_state_dict

    if text_encoder is None:
        return {}
    return {"text_encoder_lora_layers": cast_state_dict(text_encoder_lora_state_dict(text_encoder), precision),
            "text_encoder_lora_adapter_metadata": text_encoder.peft_config["default"].to_dict()}


def text_encoder_kohya_state_dict(text_encoder) -> dict:
    """The text encoder's LoRA in kohya's keys: ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``
    + ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; empty when it does not train.
    diffusers' converter names a text encoder ``lora_te1_`` (SDXL's first); SD v1.5's is ``lora_te_``."""
    from .export import kohya_state_dict

    if text_encoder is None:
        return {}
    state = kohya_state_dict(text_encoder, prefix=(FILE_PREFIX + _canonical_prefix(text_encoder)).rstrip("."))
    return {KOHYA_PREFIX + k.removeprefix("lora_te1_"): v for k, v in state.items()}


def _lora_file(folder) -> Path:
    from .export import LORA_WEIGHTS_NAME

    return Path(folder) / LORA_WEIGHTS_NAME


def check_checkpoint_text_encoder(folder: str | os.PathLike, trains_text_encoder: bool) -> None:
    """A checkpoint resumed with the other --train_text_encoder setting would lose the text encoder's
    LoRA or start it anew (and its optimizer state would not match): refused, naming the fix."""
    from safetensors import safe_open

    with safe_open(str(_lora_file(folder)), "pt") as f:
        saved = any(key.startswith(FILE_PREFIX) for key in f.keys())
    if saved != trains_text_encoder:
        raise UsageError(f"{folder} was saved {'with' if saved else 'without'} --train_text_encoder, this run "
                         f"has it {'off' if saved else 'on'}: resume with the same --train_text_encoder setting")


def load_text_encoder_lora(text_encoder, folder: str | os.PathLike) -> None:
    """The ``text_encoder.*`` keys of ``folder/pytorch_lora_weights.safetensors`` into the text encoder's
    existing "default" adapter (a checkpoint's, at resume)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    prefix = FILE_PREFIX + _canonical_prefix(text_encoder)
    saved = {k.removeprefix(prefix): v for k, v in load_file(str(_lora_file(folder))).items() if k.startswith(prefix)}
    # to diffusers' keys, then peft's (whatever the file holds), as diffusers' _set_state_dict_into_text_encoder
    peft_state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(saved))
    result = set_peft_model_state_dict(text_encoder, peft_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {folder} has text encoder LoRA keys this model lacks: {unexpected[:3]}...")


def split_hook_models(accelerator, models, unet_class, text_encoder_class) -> tuple:
    """(unet, text encoder or None), bare, among the models accelerate hands a checkpoint hook, told
    apart by type as diffusers' train_dreambooth_lora does."""
    unet = text_encoder = None
    for model in models:
        bare = accelerator.unwrap_model(model)
        if isinstance(bare, unet_class):
            unet = bare
        elif text_encoder_class is not None and isinstance(bare, text_encoder_class):
            text_encoder = bare
        else:
            raise ValueError(f"unexpected model in the checkpoint hook: {type(bare).__name__}")
    return unet, text_encoder
