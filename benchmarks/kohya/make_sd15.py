"""A random-init full-size SD v1.5 (diffusers folder), the tokenizer cache sd-scripts reads, and a kohya data
folder of the demo photos at 256 px: what benchmarks/kohya/run.sh trains on (offline; ~4 GB in OUT).

    python benchmarks/kohya/make_sd15.py OUT
"""
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from sat_train.demo import DEMO_DATA_DIR
from sat_train.models.single_file import bundled_tokenizer

out = Path(sys.argv[1])
torch.manual_seed(0)
unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                            block_out_channels=(320, 640, 1280, 1280))
vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512)
text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"))
tokenizer = bundled_tokenizer()
scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                        safety_checker=None, feature_extractor=None,
                        requires_safety_checker=False).save_pretrained(out / "sd15")
tokenizer.save_pretrained(out / "tokcache" / "openai_clip-vit-large-patch14")  # their --tokenizer_cache_dir layout
data = out / "data" / "10_face"
data.mkdir(parents=True, exist_ok=True)
for i, photo in enumerate(sorted(Path(DEMO_DATA_DIR).glob("*.jpg"))[:4]):
    Image.open(photo).convert("RGB").resize((256, 256), Image.BICUBIC).save(data / f"{i}.jpg")
    (data / f"{i}.txt").write_text("a photo of a face, detailed eyes")
