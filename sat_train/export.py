"""LoRA weights ↔ diffusers' format (``pytorch_lora_weights.safetensors``, what
``StableDiffusionPipeline.load_lora_weights`` reads), as diffusers' LoRA example writes them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def unet_lora_state_dict(unet) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, output_dir: str | os.PathLike) -> Path:
    """Writes ``output_dir/pytorch_lora_weights.safetensors`` atomically (temp folder + os.replace),
    so an interrupted save never leaves a truncated file where a good one was."""
    from diffusers import StableDiffusionPipeline

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / LORA_WEIGHTS_NAME
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(save_directory=tmp, unet_lora_layers=unet_lora_state_dict(unet),
                                                  safe_serialization=True)
        os.replace(Path(tmp) / LORA_WEIGHTS_NAME, final)
    return final


def load_lora(unet, folder: str | os.PathLike) -> None:
    """Loads ``folder/pytorch_lora_weights.safetensors`` into ``unet``'s existing "default" adapter."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(folder))
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {folder} has LoRA keys this model lacks: {unexpected[:3]}...")
