"""The LoRA adapters sat trains (peft): the UNet's, and --train_text_encoder's on the CLIP text encoders.

The UNet's adapter sits on the attention projections (to_q/k/v/out, as diffusers'
train_text_to_image_lora.py). A text encoder's sits on each encoder layer's attention (q/k/v/out_proj,
as diffusers' train_dreambooth_lora) and MLP (fc1/fc2, as kohya's sd-scripts) projections, with the
UNet's rank, alpha and dropout; which encoders and layers get one is the family's choice
(``SD15.add_text_encoder_loras``). The caption embeddings then carry gradients, and every UNet forward
of a guide that reads them (SAT's two) sends its part back to the text encoders. ``--guide_capture
separate``'s extra no-gradient capture forward reads the same embeddings: only the UNet's LoRA is off
there (``guide.capture.lora_disabled(unet)``), so the map is taken for the captions as this run encodes
them, at no second text encoding (the original CAC code had no text-encoder LoRA to follow).
"""

from __future__ import annotations

import re

import torch

from ..errors import UsageError

# The attention projections LoRA trains, as in diffusers' train_text_to_image_lora.py.
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
# The CLIP encoder layer's projections the LoRA trains: self-attention, then the MLP.
TEXT_ENCODER_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


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


def add_text_encoder_lora(text_encoder: torch.nn.Module, rank: int, alpha: float | None = None,
                          dropout: float = 0.0, read_layers: int | None = None) -> None:
    """The "default" LoRA adapter on the text encoder (B = 0: it starts unchanged), injected with peft
    directly (transformers' own add_adapter insists on a newer peft than diffusers needs). With
    ``read_layers``, only on the encoder layers below that index: those whose output is read."""
    from peft import inject_adapter_in_model

    targets = TEXT_ENCODER_LORA_TARGET_MODULES
    if read_layers is not None:  # full module names: peft matches a target against a name's end
        targets = [name for name, _ in text_encoder.named_modules()
                   if name.rpartition(".")[2] in targets and int(re.search(r"layers\.(\d+)\.", name)[1]) < read_layers]
    inject_adapter_in_model(lora_config(rank, alpha, dropout, targets), text_encoder, adapter_name="default")


def enable_text_encoder_checkpointing(text_encoder: torch.nn.Module) -> None:
    """--gradient_checkpointing for the text encoder. Non-reentrant: the reentrant kind would cut the
    LoRA's gradients, since the frozen embeddings feeding the first layer need no gradient."""
    kwargs = {"use_reentrant": False}
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # the name since transformers 5.x
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_lora_flags(config) -> None:
    if config.lora_alpha is not None and not 0.0 < config.lora_alpha < float("inf"):  # also rejects nan
        raise UsageError(f"--lora_alpha must be > 0 (the LoRA update is scaled by alpha / rank), got "
                         f"{config.lora_alpha}; leave it out for alpha = rank")
    if not 0.0 <= config.lora_dropout < 1.0:  # also rejects nan
        raise UsageError(f"--lora_dropout is a probability: give a value in [0, 1), got {config.lora_dropout}")
