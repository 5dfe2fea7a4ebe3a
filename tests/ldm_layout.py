"""diffusers → original LDM (CompVis stable-diffusion) key layout, to write single-file checkpoints
in tests: the inverse of diffusers' convert_ldm_*_checkpoint, derived from the LDM modules.

LDM's UNetModel: input_blocks[0] is conv_in; each level i has num_res_blocks (L) blocks
[ResBlock, SpatialTransformer?] and, except the last level, one [Downsample] (its conv is `op`);
middle_block is [ResBlock, SpatialTransformer, ResBlock]; output_blocks has L + 1 blocks per level
[ResBlock, SpatialTransformer?, Upsample?]. A ResBlock is in_layers (GroupNorm, SiLU, conv),
emb_layers (SiLU, Linear), out_layers (GroupNorm, SiLU, Dropout, conv) and skip_connection; the
SpatialTransformer's names are diffusers' Transformer2DModel names. LDM's VAE (Encoder/Decoder):
down[i].block[j] / downsample.conv, mid.block_1 / attn_1 / block_2, up[] numbered from the lowest
resolution, norm_out; its attention's q/k/v/proj_out are 1x1 convs. The CLIP text encoder is
transformers' CLIPTextModel under cond_stage_model.transformer.text_model. (the layout before
transformers 5.6 flattened it). A file also carries LDM's schedule buffers, which loaders ignore.
"""

from __future__ import annotations

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(state: dict, config) -> dict:
    """A diffusers UNet2DConditionModel state dict in LDM names (without the model.diffusion_model. prefix)."""
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    prefixes = unet_block_prefixes(config)
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        block = next(p for p in prefixes if key.startswith(p))
        rest = key[len(block):]
        if ".resnets." in block:
            name, _, leaf = rest.rpartition(".")
            rest = f"{UNET_RESNET[name]}.{leaf}"
        out[prefixes[block] + rest] = value
    return out


def unet_block_prefixes(config) -> dict:
    """diffusers block prefix → LDM block prefix, for any number of levels and layers per block."""
    per_level, levels = config.layers_per_block, len(config.block_out_channels)
    prefixes = {}
    for i, block_type in enumerate(config.down_block_types):
        for j in range(per_level):
            index = 1 + i * (per_level + 1) + j
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{index}.0."
            if block_type.startswith("CrossAttn"):
                prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
        if i < levels - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per_level + 1)}.0.op."
    prefixes["mid_block.resnets.0."], prefixes["mid_block.attentions.0."] = "middle_block.0.", "middle_block.1."
    prefixes["mid_block.resnets.1."] = "middle_block.2."
    for i, block_type in enumerate(config.up_block_types):
        attention = block_type.startswith("CrossAttn")
        for j in range(per_level + 1):
            index = i * (per_level + 1) + j
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{index}.0."
            if attention:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
        if i < levels - 1:
            last = i * (per_level + 1) + per_level
            prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{last}.{2 if attention else 1}.conv."
    return prefixes


def vae_to_ldm(state: dict, config) -> dict:
    """A diffusers AutoencoderKL state dict in LDM names (without the first_stage_model. prefix)."""
    levels = len(config.block_out_channels)
    out = {}
    for key, value in state.items():
        name = vae_key(key, levels)
        if ".attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[name] = value
    return out


def vae_key(key: str, levels: int) -> str:
    part, _, rest = key.partition(".")  # encoder / decoder / quant_conv / post_quant_conv
    fields = rest.split(".")
    if fields[0] == "conv_norm_out":
        return f"{part}.norm_out.{fields[-1]}"
    if fields[0] in ("down_blocks", "up_blocks"):
        level = int(fields[1]) if fields[0] == "down_blocks" else levels - 1 - int(fields[1])
        stage = "down" if fields[0] == "down_blocks" else "up"
        if fields[2] == "resnets":
            leaf = ".".join(fields[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{part}.{stage}.{level}.block.{fields[3]}.{leaf}"
        sampler = "downsample" if stage == "down" else "upsample"
        return f"{part}.{stage}.{level}.{sampler}.{'.'.join(fields[4:])}"
    if fields[0] == "mid_block" and fields[1] == "resnets":
        leaf = ".".join(fields[3:]).replace("conv_shortcut", "nin_shortcut")
        return f"{part}.mid.block_{int(fields[2]) + 1}.{leaf}"
    if fields[0] == "mid_block":
        module, leaf = ".".join(fields[3:-1]), fields[-1]
        return f"{part}.mid.attn_1.{VAE_ATTENTION[module]}.{leaf}"
    return key


def sd15_single_file(components) -> dict[str, torch.Tensor]:
    """All three models in one LDM-layout state dict, as an SD v1.5 community checkpoint holds them."""
    state = {"model.diffusion_model." + k: v for k, v in
             unet_to_ldm(components.unet.state_dict(), components.unet.config).items()}
    state.update({"first_stage_model." + k: v for k, v in
                  vae_to_ldm(components.vae.state_dict(), components.vae.config).items()})
    text = components.text_encoder.state_dict()
    state.update({"cond_stage_model.transformer.text_model." + k: v for k, v in text.items()})
    positions = components.text_encoder.config.max_position_embeddings
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2  # LDM's schedule buffers ride along
    state.update(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, 0))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}
