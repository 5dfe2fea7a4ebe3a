"""SDXL training (the UNet LoRA) on the tiny SDXL model: loading an SDXL folder, the conditioning
against diffusers' own StableDiffusionXLPipeline.encode_prompt and the written-out time ids of a
bucketed, cropped sample, the SAC / CAC steps against the steps written out by hand (pooled
embeddings and time ids in every forward), --sac_layer, the tokenizers' word positions, CLI runs
of the SDXL demo per guide and option, resume after SIGKILL and the diffusers export loaded by
StableDiffusionXLPipeline.load_lora_weights."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sat_train import demo
from sat_train.guide.capture import highest_resolution_cross_attentions
from sat_train.config.settings import TrainConfig
from sat_train.errors import UsageError
from sat_train.data.dataset import build_dataset, collate
from sat_train.data.records import read_records
from sat_train.models.family import tokenize
from sat_train.guide.guidance import build_guide
from sat_train.models.load import load_components
from sat_train.models.vae import fp16_vae_warning, vae_dtype
from sat_train.models.family import SIZE_KEYS, encode_prompt as encode_sdxl_prompt, time_ids
from sat_train import train
from sat_train.outputs.checkpoints import CONFIG_NAME
from sat_train.run.inputs import make_step_inputs
from sat_train.models.family import SD15, SDXL
from test_train_buckets import as_pixels, bucket_config, write_folder
from test_train_cac import cac_guide, written_out_cac_step
from test_train_crash import run as crash_run
from test_train_guidance import reference_sac_loss, sac_guide
from train_helpers import DEMO_DATA_DIR, LORA_FILE, lora_grads, lora_unet, run_cli, step_inputs, tiny_config

CAPTIONS = ["a photo portrait of a woman, face, eyes", "a close-up photo of a man with short dark hair"]


def sdxl_pipeline(components):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
        scheduler=EulerDiscreteScheduler.from_config(components.noise_scheduler.config))


# ----------------------------------------------------------------------------- loading


def test_sdxl_folder_loads_as_sdxl_and_a_partial_one_names_its_subfolders(tmp_path):
    import shutil

    built = demo.build_sdxl_components()
    demo.save_components(built, tmp_path / "sdxl")
    loaded = load_components(TrainConfig(pretrained_model_name_or_path=str(tmp_path / "sdxl")))
    assert loaded.family.name == "sdxl" and type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert loaded.tokenizer_2.pad_token == "!"
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        for key, value in getattr(built, name).state_dict().items():
            torch.testing.assert_close(getattr(loaded, name).state_dict()[key], value, rtol=0, atol=0)
    # --vae (--pretrained_vae_model_name_or_path) replaces an SDXL folder's VAE too
    with_vae = load_components(TrainConfig(pretrained_model_name_or_path=str(tmp_path / "sdxl"),
                                           vae=str(tmp_path / "sdxl" / "vae")))
    assert with_vae.family.name == "sdxl" and with_vae.vae is not loaded.vae
    # ... and takes a hub id, as diffusers' SDXL example (offline here: a one-line error naming it)
    hub_vae = TrainConfig(pretrained_model_name_or_path=str(tmp_path / "sdxl"), vae="madebyollin/sdxl-vae-fp16-fix")
    with pytest.raises(UsageError, match="--vae madebyollin/sdxl-vae-fp16-fix: cannot load it from the hub"):
        load_components(hub_vae.validate())
    shutil.rmtree(tmp_path / "sdxl" / "tokenizer_2")
    with pytest.raises(UsageError, match=r"not an SDXL folder: missing tokenizer_2/ \(expected .*text_encoder_2/"):
        load_components(TrainConfig(pretrained_model_name_or_path=str(tmp_path / "sdxl")))
    demo.save_components(demo.build_components(), tmp_path / "sd15")
    assert load_components(TrainConfig(pretrained_model_name_or_path=str(tmp_path / "sd15"))).family.name == "sd15"


def test_fp16_with_a_force_upcast_sdxl_vae_encodes_in_float32_and_warns():
    sdxl, sd15 = demo.build_sdxl_components(), demo.build_components()
    assert sdxl.vae.config.force_upcast  # as the stock SDXL VAE's config
    assert vae_dtype(sdxl, torch.float16) == torch.float32
    assert "madebyollin/sdxl-vae-fp16-fix" in fp16_vae_warning(sdxl, torch.float16)
    for components, dtype in ((sdxl, torch.bfloat16), (sdxl, torch.float32), (sd15, torch.float16)):
        assert vae_dtype(components, dtype) == dtype and fp16_vae_warning(components, dtype) is None
    sdxl.vae.register_to_config(force_upcast=False)  # as sdxl-vae-fp16-fix's config
    assert vae_dtype(sdxl, torch.float16) == torch.float16 and fp16_vae_warning(sdxl, torch.float16) is None


def test_fp16_step_inputs_encode_with_the_float32_vae(tmp_path):
    """fp16 weights (as prepare_models casts them) with the force_upcast VAE kept in float32: the latents
    are the float32 encode's draw, in fp16, and so are the pooled embeddings and time ids."""
    c = demo.build_sdxl_components()
    config = tiny_config(tmp_path)
    records, names = read_records(config, DEMO_DATA_DIR, quiet=True)
    batch = collate([build_dataset(config, records, names, c.tokenizers, c.family)[i] for i in (0, 1)])
    with torch.no_grad():
        expected = c.vae.encode(batch["pixel_values"]).latent_dist.sample(torch.Generator().manual_seed(0))
    for model in (c.unet, c.text_encoder, c.text_encoder_2):
        model.to(torch.float16)
    c.vae.to(vae_dtype(c, torch.float16))
    s = make_step_inputs(batch, c, config, torch.float16, torch.Generator().manual_seed(0))
    assert c.vae.dtype == torch.float32 and s.x0.dtype == s.cond.dtype == torch.float16
    torch.testing.assert_close(s.x0, expected.half() * c.vae.config.scaling_factor, rtol=0, atol=0)
    assert {v.dtype for v in s.added_cond_kwargs.values()} == {torch.float16}


# ----------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("trainable", [False, True])
def test_prompt_encoding_equals_the_sdxl_pipelines(trainable):
    c = demo.build_sdxl_components()
    expected, _, expected_pooled, _ = sdxl_pipeline(c).encode_prompt(CAPTIONS, device="cpu",
                                                                      do_classifier_free_guidance=False)
    cond, pooled = encode_sdxl_prompt(c.text_encoder, c.text_encoder_2, tokenize(c.tokenizer, CAPTIONS),
                                      tokenize(c.tokenizer_2, CAPTIONS), trainable=trainable)
    assert cond.shape == (2, 77, sum(demo.SDXL_TEXT_HIDDEN)) and pooled.shape == (2, demo.SDXL_POOLED_DIM)
    torch.testing.assert_close(cond, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-6)
    assert cond.requires_grad == pooled.requires_grad == trainable  # the encoders' weights require grad here
    with torch.no_grad():
        assert not encode_sdxl_prompt(c.text_encoder, c.text_encoder_2, tokenize(c.tokenizer, CAPTIONS),
                                      tokenize(c.tokenizer_2, CAPTIONS), trainable=True)[0].requires_grad


def test_time_ids_of_a_bucketed_randomly_cropped_sample(tmp_path):
    """A 100x64 image in the 80x48 bucket (resized to 80x51, cropped in height), a 70x64 one in the 64x64
    bucket (cropped in width), a 64x64 one (not cropped): original (H, W), the crop's (top, left) where the
    pixels show it, target (H, W), and make_step_inputs' time_ids and pooled embeddings."""
    write_folder(tmp_path / "data", {"1_a": [(100, 64), (70, 64), (64, 64)]})
    config = bucket_config(tmp_path, random_flip=False)
    records, names = read_records(config.validate(), quiet=True)
    c = demo.build_sdxl_components()
    dataset = build_dataset(config, records, names, c.tokenizers, c.family)
    seen = set()
    for index, (path, caption) in enumerate(records):
        item = dataset[index]
        with Image.open(path) as image:
            (w, h), rgb = image.size, image.convert("RGB")
        bucket_w, bucket_h = dataset.target_size(index)
        scale = max(bucket_w / w, bucket_h / h)
        resized = rgb.resize((max(bucket_w, round(w * scale)), max(bucket_h, round(h * scale))), Image.LANCZOS)
        top, left = item["crop_top_left"].tolist()
        assert 0 <= top <= resized.height - bucket_h and 0 <= left <= resized.width - bucket_w
        np.testing.assert_array_equal(as_pixels(item["pixel_values"]),
                                      np.asarray(resized)[top:top + bucket_h, left:left + bucket_w])
        assert item["original_size"].tolist() == [h, w] and item["target_size"].tolist() == [bucket_h, bucket_w]
        assert torch.equal(item["input_ids_2"], tokenize(c.tokenizer_2, [caption])[0])
        seen.add((top, left) != (0, 0))
    assert seen == {True, False}, "some samples cropped off the corner, some not"
    index = next(i for i in range(len(records)) if dataset[i]["crop_top_left"].tolist() != [0, 0])
    item = dataset[index]
    batch = collate([item])
    expected = [*item["original_size"].tolist(), *item["crop_top_left"].tolist(), *item["target_size"].tolist()]
    assert time_ids(*(batch[k] for k in SIZE_KEYS)).tolist() == [expected]
    s = make_step_inputs(batch, c, config, torch.float32, torch.Generator().manual_seed(0))
    assert s.added_cond_kwargs["time_ids"].tolist() == [[float(v) for v in expected]]
    _, _, pooled, _ = sdxl_pipeline(c).encode_prompt(records[index][1], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(s.added_cond_kwargs["text_embeds"], pooled, rtol=0, atol=1e-6)
    # SD v1.5's batches are unchanged
    plain = build_dataset(config, records, names, [c.tokenizer], SD15())[0]
    assert set(plain) == {"pixel_values", "input_ids"}


def test_latent_cache_items_carry_the_cached_center_crop(tmp_path):
    from sat_train.data.latent_cache import cache_latents

    write_folder(tmp_path / "data")
    config = bucket_config(tmp_path, cache_latents=True)
    records, names = read_records(config.validate(), quiet=True)
    c = demo.build_sdxl_components()
    dataset = build_dataset(config, records, names, c.tokenizers, c.family)
    quiet = SimpleNamespace(print=lambda *a: None, is_main_process=True, wait_for_everyone=lambda: None)
    cache_latents(config, quiet, c.vae, dataset, torch.float32)
    for index, (path, _) in enumerate(records):
        with Image.open(path) as image:
            w, h = image.size
        bucket_w, bucket_h = dataset.target_size(index)
        scale = max(bucket_w / w, bucket_h / h)
        resized_w, resized_h = max(bucket_w, round(w * scale)), max(bucket_h, round(h * scale))
        item = dataset[index]
        assert item["crop_top_left"].tolist() == [(resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2]
        assert item["original_size"].tolist() == [h, w] and item["target_size"].tolist() == [bucket_h, bucket_w]


def crop_places(pixels: np.ndarray, resized: Image.Image) -> set[tuple[bool, int, int]]:
    """Every (flipped, top, left) at which ``pixels`` sit in ``resized``, or in it flipped left-right."""
    h, w = pixels.shape[:2]
    places = set()
    for flipped in (False, True):
        image = np.asarray(resized.transpose(Image.FLIP_LEFT_RIGHT) if flipped else resized)
        for top in range(image.shape[0] - h + 1):
            for left in range(image.shape[1] - w + 1):
                if np.array_equal(image[top:top + h, left:left + w], pixels):
                    places.add((flipped, top, left))
    return places


@pytest.mark.parametrize("cache", [False, True])
def test_crop_top_left_of_a_flipped_sample_is_its_place_in_the_flipped_image(tmp_path, cache):
    """diffusers' SDXL example flips the resized image, then crops: crop_top_left is where the trained
    pixels sit in the flipped image. Random crops here; with a latent cache the center crop (its pixels
    from the uncached center-crop dataset, which draws the same flips)."""
    write_folder(tmp_path / "data", {"1_a": [(100, 64), (70, 64), (64, 100)]})
    config = bucket_config(tmp_path, random_flip=True, cache_latents=cache)
    records, names = read_records(config.validate(), quiet=True)
    c = demo.build_sdxl_components()
    dataset = build_dataset(config, records, names, c.tokenizers, c.family)
    pixel_source = dataset
    if cache:
        from sat_train.data.latent_cache import cache_latents

        quiet = SimpleNamespace(print=lambda *a: None, is_main_process=True, wait_for_everyone=lambda: None)
        cache_latents(config, quiet, c.vae, dataset, torch.float32)
        pixel_source = build_dataset(bucket_config(tmp_path, random_flip=True, center_crop=True), records, names,
                                     c.tokenizers, c.family)
    flips = set()
    for epoch in range(4):
        dataset.epoch = pixel_source.epoch = epoch
        for index, (path, _) in enumerate(records):
            item, pixels = dataset[index], as_pixels(pixel_source[index]["pixel_values"])
            with Image.open(path) as image:
                (w, h), rgb = image.size, image.convert("RGB")
            bucket_w, bucket_h = dataset.target_size(index)
            scale = max(bucket_w / w, bucket_h / h)
            resized = rgb.resize((max(bucket_w, round(w * scale)), max(bucket_h, round(h * scale))), Image.LANCZOS)
            (flipped, top, left), = crop_places(pixels, resized)  # noise images: one place only
            assert item["crop_top_left"].tolist() == [top, left], (epoch, index, flipped)
            flips.add(flipped)
    assert flips == {False, True}


# ----------------------------------------------------------------------------- layers and tokens


def sdxl_level1_attn2(unet):
    """Written out for the tiny SDXL: level 0 has no attention; level 1 is down_blocks[1] and up_blocks[1]."""
    return [unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2,
            unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2,
            unet.up_blocks[1].attentions[1].transformer_blocks[0].attn2]


def test_cac_layers_are_level_1_and_sac_layer_is_configurable(tmp_path):
    unet = lora_unet(build=demo.build_sdxl_components).unet
    assert highest_resolution_cross_attentions(unet) == sdxl_level1_attn2(unet)
    mid = unet.mid_block.attentions[0]
    default = build_guide(tiny_config(tmp_path, guide="sac"), unet, demo.build_sdxl_components().noise_scheduler)
    assert default.saliency.capture.hook.module is mid.transformer_blocks[0].attn1
    default.saliency.remove_hooks()
    config = tiny_config(tmp_path, guide="cac", sac_layer="mid_block.attentions[0].transformer_blocks[1].attn1")
    guide = build_guide(config.validate(), unet, demo.build_sdxl_components().noise_scheduler)
    assert guide.saliency.mid.capture.hook.module is mid.transformer_blocks[1].attn1
    guide.saliency.remove_hooks()
    for path, fragment in (("mid_block.attentions[0].transformer_blocks[0].attn2", "not a self-attention"),
                           ("mid_block.attentions[0].transformer_blocks[5].attn1", "has no such module"),
                           ("mid_block.attentions[0]", "not a self-attention")):
        with pytest.raises(UsageError, match=rf"--sac_layer .*{fragment}"):
            build_guide(tiny_config(tmp_path, sac_layer=path), unet, demo.build_sdxl_components().noise_scheduler)
    with pytest.raises(UsageError, match="--sac_layer 'mid block' is not a dotted module path"):
        tiny_config(tmp_path, sac_layer="mid block").validate()
    with pytest.raises(UsageError, match="--sac_layer picks the layer SAC captures"):
        tiny_config(tmp_path, guide="none", sac_layer="down_blocks.1.attentions.0.transformer_blocks.0.attn1"
                    ).validate()


def test_both_tokenizers_put_the_words_at_the_same_positions(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, guide="cac", cac_words="face,eyes,hair,woman")
    records, names = read_records(config, DEMO_DATA_DIR, quiet=True)
    c = demo.build_sdxl_components()
    ids, ids_2 = tokenize(c.tokenizer, CAPTIONS), tokenize(c.tokenizer_2, CAPTIONS)
    words = ids_2 != c.tokenizer_2.pad_token_id  # the words and the end token
    assert c.tokenizer_2.pad_token == "!" and words.any() and not words.all()
    assert torch.equal(ids[words], ids_2[words])  # the same words ...
    assert (ids[~words] == c.tokenizer.pad_token_id).all()  # ... only the padding differs
    dataset = build_dataset(config, records, names, c.tokenizers, c.family)
    assert all(len(dataset[i]["cac_tokens"]) for i in range(len(dataset)))
    # a second tokenizer without the whole-word merge of "portrait" splits it: every later word moves
    monkeypatch.setattr(demo, "WORDS", tuple(w for w in demo.WORDS if w != "portrait"))
    other = demo.build_tokenizer(pad_token="!")
    with pytest.raises(UsageError, match=r"--guide cac: the caption of .* tokenizer_2/"):
        SDXL().check_caption_words([c.tokenizer, other], config.cac_word_list, [(None, "a portrait of a face")],
                                   ["line 1"])


# ----------------------------------------------------------------------------- the guided steps


def test_sac_step_on_sdxl_matches_the_written_out_step():
    components = lora_unet(build=demo.build_sdxl_components)
    s = step_inputs(components, size=16)
    unet = components.unet
    ref_loss, mass = reference_sac_loss(components, s, 0.5)  # added_cond_kwargs in both forwards
    ref_loss.backward()
    ref_grads = lora_grads(unet)
    unet.zero_grad(set_to_none=True)
    assert mass.shape == (2, 16) and (mass > 1).any() and not (mass > 1).all()
    result = sac_guide(components, ratio=0.5)(unet, s)
    result.loss.backward()
    torch.testing.assert_close(result.loss, ref_loss, rtol=0, atol=1e-5)
    for name, grad in lora_grads(unet).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the conditioning matters: other time ids give another loss
    s.added_cond_kwargs = {**s.added_cond_kwargs, "time_ids": s.added_cond_kwargs["time_ids"] * 4}
    with torch.no_grad():
        assert not torch.allclose(sac_guide(components, ratio=0.5)(unet, s).loss, ref_loss, atol=1e-4)


def test_cac_step_on_sdxl_matches_the_written_out_step():
    components = lora_unet(build=demo.build_sdxl_components)
    s = step_inputs(components, size=16)
    s.tokens = torch.tensor([[3, 5, 9], [-1, -1, -1]])  # sample 1 has no chosen word: SAC fallback
    unet, ratio = components.unet, 0.5
    # level 1 of 16x16 latents: an 8x8 CAC map; the mid block: 4x4
    ref_loss, cac, ref_grads = written_out_cac_step(components, s, ratio, (8, 8), (4, 4), layers=sdxl_level1_attn2)
    result = cac_guide(components, ratio=ratio)(unet, s)
    result.loss.backward()
    torch.testing.assert_close(result.loss, ref_loss, rtol=0, atol=1e-5)
    cac_mask = cac[0] > cac[0].mean()
    assert 0 < cac_mask.float().mean() < 1
    assert torch.equal(result.mask[0].flatten(), cac_mask.view(8, 8).repeat_interleave(2, 0).repeat_interleave(2, 1)
                       .flatten())
    for name, grad in lora_grads(unet).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- runs


def sdxl_run(tmp_path, name, **overrides):
    return load_file(train(tiny_config(tmp_path / name, demo_model="sdxl", **overrides)))


def test_sdxl_demo_cli_run(tmp_path):
    out, guide = tmp_path / "out", "cac"
    proc = run_cli("--demo", "sdxl", "--guide", guide, "--resolution", "64", "--max_train_steps", "2",
                   "--report_to", "none", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny random SDXL-shaped model" in proc.stdout
    assert "--pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0" in proc.stdout
    assert "--resolution 1024" in proc.stdout
    saved = json.loads((out / CONFIG_NAME).read_text())
    assert saved["demo_model"] == "sdxl"
    assert (out / LORA_FILE).is_file()
    assert list((out / "masks").glob("*.png"))
    assert "CAC: 0 of 4 samples had none of --cac_words" in proc.stdout


def test_sdxl_guides_and_options_train_and_recompute_and_checkpointing_are_exact(tmp_path):
    plain = sdxl_run(tmp_path, "plain", guide="sac")
    unguided = sdxl_run(tmp_path, "none", guide="none")
    assert unguided.keys() == plain.keys() and any(not torch.equal(unguided[k], plain[k]) for k in plain)
    for name, flags in (("recompute", {"guide_recompute": True}), ("ckpt", {"gradient_checkpointing": True})):
        got = sdxl_run(tmp_path, name, guide="sac", **flags)
        for key, value in plain.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    for name, flags in (("detach", {"guide_detach_degraded": True}), ("separate", {"guide_capture": "separate"})):
        got = sdxl_run(tmp_path, name, guide="cac", **flags)  # they run and train (B starts at 0)
        assert got.keys() == plain.keys() and all(torch.isfinite(v).all() for v in got.values())
        assert all(got[k].abs().sum() > 0 for k in got if "lora_B" in k or "lora.up" in k)


def test_sdxl_run_killed_while_checkpointing_resumes_bit_exact(tmp_path):
    expected = sdxl_run(tmp_path, "straight", guide="sac", max_train_steps=4, checkpointing_steps=2)
    out = tmp_path / "crashy"
    proc = crash_run(out, "checkpoint-4:mid", resume=False, extra=["--demo_model", "sdxl"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc = crash_run(out, None, resume=True, extra=["--demo_model", "sdxl"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stdout
    got = load_file(out / LORA_FILE)
    assert got.keys() == expected.keys() and len(got) > 0
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_exported_lora_loads_into_the_sdxl_pipeline(tmp_path):
    from sat_train.outputs.lora_files import export_lora

    trained = lora_unet(build=demo.build_sdxl_components)
    s = step_inputs(trained, size=8)
    with torch.no_grad():
        expected = trained.unet(s.noisy, s.timesteps, s.cond, added_cond_kwargs=s.added_cond_kwargs).sample
    export_lora(trained.unet, tmp_path, "diffusers")
    pipe = sdxl_pipeline(demo.build_sdxl_components())
    with torch.no_grad():
        base = pipe.unet(s.noisy, s.timesteps, s.cond, added_cond_kwargs=s.added_cond_kwargs).sample
        pipe.load_lora_weights(tmp_path / LORA_FILE)
        got = pipe.unet(s.noisy, s.timesteps, s.cond, added_cond_kwargs=s.added_cond_kwargs).sample
    assert not torch.allclose(base, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_demo_model_flag_needs_the_demo(tmp_path):  # SDXL's --train_text_encoder: tests/test_sdxl_exports.py
    with pytest.raises(UsageError, match="--demo_model sdxl picks the embedded demo's model"):
        tiny_config(tmp_path, demo_model="sdxl", pretrained_model_name_or_path=str(tmp_path),
                    train_data_dir=str(tmp_path)).validate()


@pytest.mark.parametrize("cache", [False, True])
def test_bucketed_run_on_an_sdxl_folder(tmp_path, cache):
    """An SDXL folder, aspect-ratio buckets, CAC (both tokenizers checked), with and without a latent cache."""
    write_folder(tmp_path / "data", {"1_a": [(100, 64), (70, 64), (64, 100), (64, 64)]})
    demo.save_components(demo.build_sdxl_components(), tmp_path / "model")
    config = bucket_config(tmp_path, guide="cac", cac_words="face", max_train_steps=2, cache_latents_to_disk=cache)
    weights = load_file(train(config))
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert json.loads((tmp_path / "out" / CONFIG_NAME).read_text())["demo_model"] == "sd15"  # not a demo run
