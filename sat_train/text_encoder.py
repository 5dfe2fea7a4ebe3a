"""--train_text_encoder: a LoRA on the CLIP text encoder, trained alongside the UNet's.

The adapter sits on each encoder layer's attention (q/k/v/out_proj, as diffusers'
train_dreambooth_lora) and MLP (fc1/fc2, as kohya's sd-scripts) projections, with the UNet's rank,
alpha and dropout. The caption embeddings ``cond`` then carry gradients, and every UNet forward of a
guide that reads ``cond`` (SAT's two) sends its part back to the text encoder. ``--guide_capture
separate``'s extra no-gradient capture forward reads the same ``cond``: only the UNet's LoRA is off
there (``capture.lora_disabled(unet)``), so the map is taken for the captions as this run encodes
them, at no second text encoding (the original CAC code had no text-encoder LoRA to follow).

SDXL: both text encoders (CLIP-L's CLIPTextModel, CLIP-G's CLIPTextModelWithProjection) get the same
adapter, each in its own param group at --text_encoder_lr (kohya's sdxl_train_network has one
text-encoder lr for both; only its full fine-tune, sdxl_train.py, splits --learning_rate_te1/te2).

Files: the text encoders' LoRA goes into the same file as the UNet's (diffusers: ``text_encoder.*``
and SDXL's ``text_encoder_2.*`` keys and their adapter metadata; kohya: SD v1.5's ``lora_te_*``,
SDXL's ``lora_te1_*`` / ``lora_te2_*``, the names sd-scripts writes and ComfyUI's key map reads),
keyed by CLIPTextModel's names (``text_model.encoder.layers.N...``). Recent transformers flatten
CLIPTextModel (no ``text_model`` level); diffusers' loader strips the prefix again for such models,
and A1111/ComfyUI expect it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .config import TrainConfig, UsageError

# The CLIP encoder layer's projections the LoRA trains: self-attention, then the MLP.
TEXT_ENCODER_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FILE_PREFIX = "text_encoder."  # diffusers' name for the text encoder's keys in a LoRA file
FILE_PREFIX_2 = "text_encoder_2."  # SDXL's second text encoder's
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
                          dropout: float = 0.0, read_layers: int | None = None) -> None:
    """The "default" LoRA adapter on the text encoder (B = 0: it starts unchanged), injected with peft
    directly (transformers' own add_adapter insists on a newer peft than diffusers needs). With
    ``read_layers``, only on the encoder layers below that index: those whose output is read."""
    from peft import inject_adapter_in_model

    from .models import lora_config

    targets = TEXT_ENCODER_LORA_TARGET_MODULES
    if read_layers is not None:  # full module names: peft matches a target against a name's end
        targets = [name for name, _ in text_encoder.named_modules()
                   if name.rpartition(".")[2] in targets and int(re.search(r"layers\.(\d+)\.", name)[1]) < read_layers]
    inject_adapter_in_model(lora_config(rank, alpha, dropout, targets), text_encoder, adapter_name="default")


def add_sdxl_text_encoder_loras(text_encoder, text_encoder_2, rank: int, alpha: float | None = None,
                                dropout: float = 0.0) -> None:
    """SDXL's two adapters. SDXL reads the first encoder's penultimate hidden states (diffusers'
    pipeline and train_text_to_image_lora_sdxl, sd-scripts), so its last layer gets no LoRA: one
    there would never get a gradient (and DDP stops on parameters without one). The second's last
    layer feeds the pooled embedding: it keeps its LoRA."""
    add_text_encoder_lora(text_encoder, rank, alpha, dropout, read_layers=text_encoder.config.num_hidden_layers - 1)
    add_text_encoder_lora(text_encoder_2, rank, alpha, dropout)


def add_text_encoder_loras(components, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
    """--train_text_encoder's adapters: SD v1.5's one text encoder, or SDXL's two."""
    if components.is_sdxl:
        add_sdxl_text_encoder_loras(components.text_encoder, components.text_encoder_2, rank, alpha, dropout)
    else:
        add_text_encoder_lora(components.text_encoder, rank, alpha, dropout)


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


def optimizer_param_groups(config: TrainConfig, unet_params, text_encoder_params, lr_scale: float = 1.0,
                           text_encoder_2_params=()) -> list:
    """The optimizer's groups: the UNet's LoRA at --learning_rate, each text encoder's (when it trains:
    SDXL's second after the first) at --text_encoder_lr; ``lr_scale`` (--scale_lr) multiplies all.
    The lr schedule scales every group."""
    groups = [{"params": list(unet_params), "lr": config.learning_rate * lr_scale}]
    for params in (text_encoder_params, text_encoder_2_params):
        if params:
            groups.append({"params": list(params), "lr": text_encoder_learning_rate(config) * lr_scale})
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


def text_encoder_save_kwargs(text_encoder, precision: str = "float", text_encoder_2=None) -> dict:
    """What ``save_lora_weights`` (StableDiffusionPipeline's, or SDXL's with ``text_encoder_2``) takes
    for the text encoders that train (nothing when none does): each one's LoRA (in --save_precision
    ``precision``) and its peft LoraConfig, from which ``load_lora_weights`` builds the adapter (so
    alpha / rank survives)."""
    from .lora_files import cast_state_dict

    kwargs = {}
    for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            kwargs[f"{name}_lora_layers"] = cast_state_dict(text_encoder_lora_state_dict(model), precision)
            kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    return kwargs


def text_encoder_kohya_state_dict(text_encoder, text_encoder_2=None) -> dict:
    """The text encoders' LoRA in kohya's keys: ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``
    + ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` for SD v1.5's one, ``lora_te1_...`` and
    ``lora_te2_...`` for SDXL's pair (given ``text_encoder_2``: they train together); empty when none
    trains. diffusers' converter already names them ``lora_te1_`` / ``lora_te2_``."""
    from .export import kohya_state_dict

    state = {}
    for file_prefix, model in ((FILE_PREFIX, text_encoder), (FILE_PREFIX_2, text_encoder_2)):
        if model is not None:
            state.update(kohya_state_dict(model, prefix=(file_prefix + _canonical_prefix(model)).rstrip(".")))
    if text_encoder_2 is None:  # SD v1.5
        return {KOHYA_PREFIX + k.removeprefix("lora_te1_"): v for k, v in state.items()}
    return state


def _lora_file(folder) -> Path:
    from .export import LORA_WEIGHTS_NAME

    return Path(folder) / LORA_WEIGHTS_NAME


def check_checkpoint_text_encoder(folder: str | os.PathLike, trains_text_encoder: bool, sdxl: bool = False) -> None:
    """A checkpoint resumed with the other --train_text_encoder setting would lose the text encoders'
    LoRA or start it anew (and its optimizer state would not match): refused, naming the fix. For
    SDXL both encoders' keys must be there (or neither)."""
    from safetensors import safe_open

    with safe_open(str(_lora_file(folder)), "pt") as f:
        found = {prefix for key in f.keys() for prefix in (FILE_PREFIX, FILE_PREFIX_2) if key.startswith(prefix)}
    saved = bool(found)
    if sdxl and saved and found != {FILE_PREFIX, FILE_PREFIX_2}:
        raise UsageError(f"{folder} holds the LoRA of only one of SDXL's text encoders ({', '.join(sorted(found))}"
                         "*): resume from a checkpoint this trainer saved with --train_text_encoder")
    if saved != trains_text_encoder:
        raise UsageError(f"{folder} was saved {'with' if saved else 'without'} --train_text_encoder, this run "
                         f"has it {'off' if saved else 'on'}: resume with the same --train_text_encoder setting")


def load_text_encoder_lora(text_encoder, folder: str | os.PathLike, file_prefix: str = FILE_PREFIX) -> None:
    """The ``file_prefix`` keys (``text_encoder.*``, or SDXL's second's ``text_encoder_2.*``) of
    ``folder/pytorch_lora_weights.safetensors`` into that text encoder's existing "default" adapter
    (a checkpoint's, at resume)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    prefix = file_prefix + _canonical_prefix(text_encoder)
    saved = {k.removeprefix(prefix): v for k, v in load_file(str(_lora_file(folder))).items() if k.startswith(prefix)}
    # to diffusers' keys, then peft's (whatever the file holds), as diffusers' _set_state_dict_into_text_encoder
    peft_state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(saved))
    result = set_peft_model_state_dict(text_encoder, peft_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {folder} has text encoder LoRA keys this model lacks: {unexpected[:3]}...")


def split_hook_models(accelerator, models, unet_class, text_encoder_class, text_encoder_2_class=None) -> tuple:
    """(unet, text encoder or None, SDXL's second text encoder or None), bare, among the models
    accelerate hands a checkpoint hook, told apart by type as diffusers' train_dreambooth_lora_sdxl
    does (CLIPTextModelWithProjection is no subclass of CLIPTextModel)."""
    found = [None, None, None]
    classes = (unet_class, text_encoder_class, text_encoder_2_class)
    for model in models:
        bare = accelerator.unwrap_model(model)
        slot = next((i for i, cls in enumerate(classes) if cls is not None and isinstance(bare, cls)), None)
        if slot is None:
            raise ValueError(f"unexpected model in the checkpoint hook: {type(bare).__name__}")
        found[slot] = bare
    return tuple(found)
