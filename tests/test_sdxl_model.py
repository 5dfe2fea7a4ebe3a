"""The tiny SDXL-shaped model (demo.build_sdxl_components): SDXL's structure, and a folder that
diffusers' own StableDiffusionXLPipeline loads and runs (save_pretrained -> from_pretrained)."""

import torch

from sat_train import demo


def test_tiny_sdxl_has_sdxl_structure():
    c = demo.build_sdxl_components()
    assert c.family.name == "sdxl" and not demo.build_components().family.name == "sdxl"
    config = c.unet.config
    assert config.addition_embed_type == "text_time"
    assert not hasattr(c.unet.down_blocks[0], "attentions")  # no attention at level 0, as SDXL
    assert len(c.unet.mid_block.attentions[0].transformer_blocks) > 1
    assert config.cross_attention_dim == c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
    assert config.projection_class_embeddings_input_dim == (c.text_encoder_2.config.projection_dim
                                                            + 6 * config.addition_time_embed_dim)
    assert c.tokenizer_2.pad_token == "!" and c.tokenizer.pad_token == "<|endoftext|>"


def test_tiny_sdxl_round_trips_through_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    c = demo.build_sdxl_components()
    demo.save_components(c, tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        saved = dict(getattr(pipe, name).state_dict())
        for key, value in getattr(c, name).state_dict().items():
            torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a face", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()
