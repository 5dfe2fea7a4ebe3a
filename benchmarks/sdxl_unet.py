"""The full-size SDXL UNet's config, for building it with random weights (no download); no imports.

stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (what diffusers' single-file converter
makes of sd_xl_base.yaml), the fields that differ from UNet2DConditionModel's defaults: 2,567,463,684
parameters. The mid block stacks transformer_layers_per_block[-1] = 10 transformer blocks; at 1024 px
it runs 32x32 = 1024 tokens with 20 heads of 64 channels, the 64x64 level 10 heads.
"""

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled text embeds + 6 time ids x 256
)
