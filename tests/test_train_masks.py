"""Loss masks (--masked_loss, --conditioning_data_dir, --alpha_mask, --unmasked_weight,
--normalize_masked_area_loss), --face_masks and --guide_within_mask: the masked loss against kohya's
``apply_masked_loss`` and OneTrainer's weighting written out here, masks aligned with their images through
buckets, flips and the latent cache, face masks on real photos, SAT's blur inside the mask, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from sat_train import train
from sat_train.cli import main
from sat_train.data.dataset import LOSS_MASK, ImageTransform, build_dataset
from sat_train.data.latent_cache import LatentCache, cache_entry
from sat_train.data.masks import ALPHA, LossMasks, find_mask_file, read_mask_sources
from sat_train.data.records import read_records
from sat_train.demo import DEMO_DATA_DIR, build_tokenizer
from sat_train.errors import UsageError
from sat_train.guide.capture import MidBlockCapture
from sat_train.guide.guidance import MidBlockSaliency, SATGuide
from sat_train.guide.loss import StepLoss
from sat_train.guide.masks import latent_loss_mask
from sat_train.guide.settings import GuideSettings
from sat_train.models.family import SD15
from sat_train.outputs.kohya_metadata import kohya_training_metadata, mask_metadata
from sat_train.seeding import derived_generator
from train_helpers import LORA_FILE, REPO, block_imports, lora_unet, padded_square, step_inputs, tiny_config

DEMO_IMAGES = sorted(p for p in DEMO_DATA_DIR.iterdir() if p.suffix == ".jpg")


def area_downsample(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Each factor x factor block's mean (what F.interpolate mode="area" does at an integer ratio)."""
    b, c, h, w = mask.shape
    return mask.view(b, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("unmasked_weight, normalize, min_snr", [(0.0, False, False), (0.25, False, True),
                                                                  (0.0, True, False), (0.4, True, True)])
def test_masked_loss_is_kohyas_formula_with_onetrainers_options(unmasked_weight, normalize, min_snr):
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    pixel_mask = torch.rand(3, 1, 64, 64, generator=gen)
    weights = torch.rand(3, generator=gen) + 0.5 if min_snr else None
    # kohya's apply_masked_loss: the mask area-downsampled to the loss, times the elementwise loss, the
    # per-sample mean; OneTrainer: weight mask + W (1 - mask), divided by its per-sample mean when normalizing
    mask = area_downsample(pixel_mask, 8)
    weight = mask + unmasked_weight * (1 - mask)
    per_sample = (F.mse_loss(pred, target, reduction="none") * weight).mean(dim=[1, 2, 3])
    if normalize:
        per_sample = per_sample / weight.mean(dim=[1, 2, 3])
    if weights is not None:
        per_sample = per_sample * weights
    expected = per_sample.mean()

    got = StepLoss()(pred, target, torch.zeros(3, dtype=torch.long), weights,
                     latent_loss_mask(pixel_mask, (8, 8), unmasked_weight, normalize))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_a_full_mask_is_no_mask_and_a_zero_weight_is_exactly_the_mask():
    assert latent_loss_mask(torch.ones(2, 1, 16, 16), (2, 2)) is None  # the plain-mse path, bit for bit
    half = torch.ones(2, 1, 16, 16)
    half[..., :8] = 0
    mask = latent_loss_mask(half, (2, 2))
    assert mask.region[:, :, :, 0].eq(0).all() and mask.region[:, :, :, 1].eq(1).all()
    assert torch.equal(mask.weight, mask.region)  # kohya's W = 0: the mask itself, no rounding


# ----------------------------------------------------------------------------- real runs


def write_masks(folder, painter) -> None:
    """A mask per demo photo, same stem, .png: ``painter(mask)`` paints a (128, 128) uint8 array."""
    folder.mkdir(parents=True, exist_ok=True)
    for image in DEMO_IMAGES:
        mask = np.zeros((128, 128), dtype=np.uint8)
        painter(mask)
        Image.fromarray(mask).save(folder / f"{image.stem}.png")


@pytest.mark.parametrize("guide", ["none", "sac", "cac"])
def test_a_full_mask_trains_the_unmasked_run_bit_for_bit_and_a_half_mask_does_not(tmp_path, guide):
    write_masks(tmp_path / "full", lambda m: m.fill(255))
    write_masks(tmp_path / "half", lambda m: m.__setitem__((slice(None), slice(64, None)), 255))
    plain = load_file(train(tiny_config(tmp_path / "plain", guide=guide)))
    full = load_file(train(tiny_config(tmp_path / "f", guide=guide, masked_loss=True,
                                       conditioning_data_dir=str(tmp_path / "full"))))
    half = load_file(train(tiny_config(tmp_path / "h", guide=guide, masked_loss=True,
                                       conditioning_data_dir=str(tmp_path / "half"))))
    assert plain.keys() == full.keys() == half.keys() and plain
    assert all(torch.equal(plain[k], full[k]) for k in plain)
    assert any(not torch.equal(plain[k], half[k]) for k in plain if "lora.up" in k)


# ----------------------------------------------------------------------------- masks follow their images


def square_photo(size, square, alpha=False) -> Image.Image:
    """R = 255 inside ``square`` (x0, y0, x1, y1), 0 elsewhere; G and B noise. With ``alpha``: R = 0 and
    alpha = 255 inside the square, 0 elsewhere (trained over white, the RGB image's R is then 255 - alpha)."""
    w, h = size
    rng = np.random.default_rng(w * h)
    pixels = rng.integers(0, 256, (h, w, 4 if alpha else 3), dtype=np.uint8)
    x0, y0, x1, y1 = square
    pixels[..., 0] = 0
    pixels[y0:y1, x0:x1, 3 if alpha else 0] = 255
    if alpha:
        pixels[..., 3][pixels[..., 3] != 255] = 0
    return Image.fromarray(pixels)


def mask_of(pixels: torch.Tensor, alpha: bool) -> torch.Tensor:
    """Where a sample's square is, from its image: R, or 1 - R for an alpha square composited over white."""
    red = (pixels[0] + 1) / 2
    return 1 - red if alpha else red


@pytest.mark.parametrize("source", ["files", "alpha"])
def test_masks_follow_their_images_through_buckets_flips_and_the_latent_cache(tmp_path, source):
    """A painted square in each image's R channel and its mask: after every transform the sample's mask is the
    sample's R channel, exactly (one geometry, one filter), in random crops and flips across epochs and buckets,
    and in the latent cache's center crops with each sample's flip draw."""
    shapes = {"2_square": [(64, 64), (72, 80)], "1_tall": [(60, 100)], "1_wide": [(100, 60)]}
    data, masks = tmp_path / "data", tmp_path / "masks"
    for sub, sizes in shapes.items():
        (data / sub).mkdir(parents=True)
        (masks / sub).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            square = (w // 5, h // 3, w // 5 + w // 3, h // 3 + h // 4)
            square_photo((w, h), square, alpha=source == "alpha").save(data / sub / f"im{i}.png")
            (data / sub / f"im{i}.txt").write_text("a photo of a face")
            Image.fromarray(np.asarray(square_photo((w, h), square))[..., 0]).save(masks / sub / f"im{i}.png")
    flags = dict(alpha_mask=True) if source == "alpha" else dict(masked_loss=True, conditioning_data_dir=str(masks))
    config = tiny_config(tmp_path / "out", pretrained_model_name_or_path=str(tmp_path / "model"),
                         train_data_dir=str(data), caption_extension=".txt", enable_bucket=True, resolution=64,
                         min_bucket_reso=48, max_bucket_reso=128, bucket_reso_steps=16, random_flip=True,
                         image_interpolation_mode="bilinear", **flags).validate()
    records, names = read_records(config, quiet=True)
    sources = read_mask_sources(config, records, names, None, data, None if source == "alpha" else masks)
    assert all(s == ALPHA for s in sources) if source == "alpha" else all(s.parent.parent == masks for s in sources)
    dataset = build_dataset(config, records, names, [build_tokenizer()], SD15())
    dataset.loss_masks = LossMasks(sources, dataset.records, dataset.transform)
    flipped_seen = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            red = mask_of(item["pixel_values"], source == "alpha")
            assert item[LOSS_MASK].shape == (1, *red.shape) == (1, *dataset.target_size(index)[::-1])
            torch.testing.assert_close(item[LOSS_MASK][0], red, atol=1e-6, rtol=0)
            assert 0 < item[LOSS_MASK].mean() < 1
            geometry = dataset.transform.geometry(dataset.record_sizes()[index], derived_generator(
                dataset.seed, epoch, index), dataset.target_size(index))
            flipped_seen.add(geometry.flipped)
    assert flipped_seen == {False, True}

    # the latent cache: the entry's center crop (what cache_latents encodes), flipped as the sample draws
    center = ImageTransform(dataset.transform.resolution, True, False, dataset.transform.interpolation)
    entries = [cache_entry(dataset, i, size, center, {}) for i, size in enumerate(dataset.record_sizes())]
    zeros = {e.name: {False: torch.zeros(8, 2, 2), True: torch.zeros(8, 2, 2)} for e in entries}
    dataset.latent_cache = LatentCache(entries, SD15(), store=zeros)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            encoded = dataset.pixels(index, transform=center)  # as encode_entries takes it, then its mirror
            flipped = dataset.transform.draws_flip(derived_generator(dataset.seed, epoch, index))
            red = mask_of(encoded.flip(-1) if flipped else encoded, source == "alpha")
            torch.testing.assert_close(dataset[index][LOSS_MASK][0], red, atol=1e-6, rtol=0)


def test_mask_files_are_found_mirrored_or_flat(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    (data / "10_anna").mkdir(parents=True)
    (masks / "10_anna").mkdir(parents=True)
    image = data / "10_anna" / "a.jpg"
    image.touch()
    (masks / "a.png").touch()
    assert find_mask_file(image, data, masks) == masks / "a.png"  # flat
    (masks / "10_anna" / "a.webp").touch()
    assert find_mask_file(image, data, masks) == masks / "10_anna" / "a.webp"  # the mirrored subfolder first
    assert find_mask_file(data / "10_anna" / "b.jpg", data, masks) is None


# ----------------------------------------------------------------------------- face masks


def test_face_masks_on_real_photos_cover_the_detected_face_and_are_reused(tmp_path, capsys):
    pytest.importorskip("cv2")
    skimage_data = pytest.importorskip("skimage.data")
    from sat_train.data.masks import FACE_MASK_FOLDER
    from sat_train.evaluate.faces import detect_faces
    from sat_train.run.face_masks import make_face_masks

    photos = {"astronaut": Image.fromarray(skimage_data.astronaut())}
    cbook = pytest.importorskip("matplotlib.cbook")
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper"] = Image.open(f).convert("RGB")
    data = tmp_path / "data"
    (data / "3_person").mkdir(parents=True)
    for name, photo in photos.items():
        padded_square(photo, 256).save(data / "3_person" / f"{name}.png")
        (data / "3_person" / f"{name}.txt").write_text("a photo of a face")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(data / "3_person" / "noise.png")
    (data / "3_person" / "noise.txt").write_text("noise")
    config = tiny_config(tmp_path / "out", pretrained_model_name_or_path=str(tmp_path / "model"),
                         train_data_dir=str(data), caption_extension=".txt", face_masks=True,
                         face_mask_margin=0.5).validate()
    from sat_train.data.records import collect_records

    records = collect_records(config, quiet=True)
    folder = make_face_masks(config, records, data)
    assert folder == tmp_path / "out" / FACE_MASK_FOLDER
    out = capsys.readouterr().out
    assert "noise.png: no face found: trained unmasked" in out and "3 made, 0 reused" in out
    for name in photos:
        with Image.open(data / "3_person" / f"{name}.png") as image:
            (face, *_) = detect_faces(image)
        mask = np.asarray(Image.open(folder / "3_person" / f"{name}.png"))
        x0, y0, x1, y1 = face.box
        w, h = x1 - x0, y1 - y0
        assert (mask[y0:y1, x0:x1] == 255).all()  # the face, and the first half of the margin, fully masked
        assert (mask[max(0, y0 - h // 8):y1 + h // 8, max(0, x0 - w // 8):x1 + w // 8] == 255).all()
        # the feather: linear from 1 at margin/2 = 0.25 w out to 0 at margin 0.5 w out (pixel centres)
        row, column = (y0 + y1) // 2, x1 + int(0.375 * w)
        expected = 1 - ((column + 0.5) - (x1 + 0.25 * w)) / (0.25 * w)
        assert mask[row, column] == pytest.approx(255 * expected, abs=1)
        far = np.ones_like(mask, dtype=bool)
        far[max(0, y0 - h // 2 - 1):y1 + h // 2 + 1, max(0, x0 - w // 2 - 1):x1 + w // 2 + 1] = False
        assert (mask[far] == 0).all() and 0.02 < (mask > 0).mean() < 0.9
    assert (np.asarray(Image.open(folder / "3_person" / "noise.png")) == 255).all()  # no face: a full mask

    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}
    make_face_masks(config, records, data)  # a rerun (or a resume) reuses every mask
    assert "0 made, 3 reused" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")} == before

    strict = tiny_config(tmp_path / "out", pretrained_model_name_or_path=str(tmp_path / "model"),
                         train_data_dir=str(data), caption_extension=".txt", face_masks=True, face_mask_margin=0.5,
                         strict_data=True)
    with pytest.raises(UsageError, match="noise.png: no face found for --face_masks"):
        make_face_masks(strict, records, data)


# ----------------------------------------------------------------------------- SAT inside the mask


def test_guide_within_mask_blurs_only_inside_the_loss_mask():
    """x_deg of the second forward = sqrt(ab) (m blur(x0) + (1 - m) x0) + sqrt(1 - ab) pred, with m the SAC
    mask AND the loss mask > 0.5 (the reference blur, sat_kernels/reference.py)."""
    from sat_kernels.reference import gaussian_blur

    components = lora_unet()
    unet, scheduler = components.unet, components.noise_scheduler
    s = step_inputs(components, batch=2, size=16)
    pixel_mask = torch.zeros(2, 1, 128, 128)
    pixel_mask[0, :, 16:80, 24:104] = 1.0
    pixel_mask[1, :, 64:, :64] = 0.7
    s.loss_mask = latent_loss_mask(pixel_mask, (16, 16), within_mask=True)
    seen = []

    def forward(latents):
        out = unet(latents, s.timesteps, s.cond, return_dict=False)[0]
        seen.append((latents.detach(), out.detach()))
        return out

    s.forward = forward
    settings = GuideSettings(threshold="mean", kernel_backend="torch")
    guide = SATGuide(MidBlockSaliency(MidBlockCapture(unet, "torch")), scheduler.alphas_cumprod, settings)
    with torch.no_grad():
        result = guide(unet, s)
    free = SATGuide(MidBlockSaliency(MidBlockCapture(unet, "torch")), scheduler.alphas_cumprod, settings)
    s_free = step_inputs(components, batch=2, size=16)
    with torch.no_grad():
        sac_mask = free(unet, s_free).mask  # the unrestricted SAC mask of the same batch
    region = area_downsample(pixel_mask, 8)[:, 0] > 0.5
    m = (sac_mask & region)[:, None].float()
    assert torch.equal(result.mask, m[:, 0].bool()) and m.any() and (sac_mask & ~region).any()
    (_, pred), (x_deg, _) = seen
    ab = scheduler.alphas_cumprod[s.timesteps].view(-1, 1, 1, 1)
    expected = ab.sqrt() * (m * gaussian_blur(s.x0) + (1 - m) * s.x0) + (1 - ab).sqrt() * pred
    torch.testing.assert_close(x_deg, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input and exports


def bad_mask(tmp_path, what):
    folder = tmp_path / "masks"
    write_masks(folder, lambda m: m.fill(255))
    first = folder / f"{DEMO_IMAGES[0].stem}.png"
    if what == "missing":
        first.unlink()
    elif what == "size":
        Image.new("L", (64, 128), 255).save(first)
    elif what == "mode":
        first.unlink()
        Image.new("CMYK", (128, 128)).save(folder / f"{DEMO_IMAGES[0].stem}.jpg")
    elif what == "zero":
        Image.new("L", (128, 128), 0).save(first)
    return folder


@pytest.mark.parametrize("what, fragment", [
    ("missing", "has no mask in"), ("size", "is 64x128, its image"), ("mode", "is a CMYK image, not 8-bit"),
    ("zero", "is all zero: nothing of the image would be learned")])
def test_bad_mask_files_stop_in_one_line_before_models_load(tmp_path, capsys, monkeypatch, what, fragment):
    import sat_train.demo

    monkeypatch.setattr(sat_train.demo, "build_components", lambda *a: pytest.fail("a model was built"))
    folder = bad_mask(tmp_path, what)
    with pytest.raises(SystemExit) as exit_info:
        main(["--masked_loss", "--conditioning_data_dir", str(folder), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert DEMO_IMAGES[0].stem in err


def test_an_all_zero_mask_is_fine_with_an_unmasked_weight(tmp_path):
    folder = bad_mask(tmp_path, "zero")
    config = tiny_config(tmp_path / "out", masked_loss=True, conditioning_data_dir=str(folder), unmasked_weight=0.1)
    records, names = read_records(config.validate(), DEMO_DATA_DIR, quiet=True)
    assert len(read_mask_sources(config, records, names, None, DEMO_DATA_DIR, folder)) == len(records)


@pytest.mark.parametrize("flags, fragment", [
    (["--alpha_mask"], "has no alpha channel"),
    (["--masked_loss"], "--masked_loss needs masks"),
    (["--masked_loss", "--alpha_mask", "--unmasked_weight", "1.5"], "--unmasked_weight is the loss weight"),
    (["--normalize_masked_area_loss"], "--normalize_masked_area_loss acts on the masked loss"),
    (["--unmasked_weight", "0.1"], "--unmasked_weight acts on the masked loss"),
    (["--guide_within_mask"], "--guide_within_mask acts on the masked loss"),
    (["--alpha_mask", "--guide_within_mask", "--guide", "none"], "--guide_within_mask restricts SAT's blur"),
    (["--face_mask_margin", "0.5"], "--face_mask_margin widens"),
    (["--alpha_mask", "--face_masks"], "two mask sources"),
    (["--conditioning_data_dir", "."], "add --masked_loss"),
])
def test_bad_mask_flags_stop_in_one_line_before_models_load(tmp_path, capsys, monkeypatch, flags, fragment):
    import sat_train.demo

    monkeypatch.setattr(sat_train.demo, "build_components", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_face_masks_without_the_eval_extra_name_the_install(tmp_path, capsys, monkeypatch):
    block_imports(monkeypatch, "cv2")
    with pytest.raises(SystemExit) as exit_info:
        main(["--face_masks", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and 'pip install -e ".[eval]"' in err, err


def test_exports_record_the_mask_settings(tmp_path):
    config = tiny_config(tmp_path, face_masks=True, face_mask_margin=0.4, unmasked_weight=0.1,
                         normalize_masked_area_loss=True, guide_within_mask=True)
    kohya = kohya_training_metadata(config, 2, 1, 2, SD15())
    assert (kohya["ss_masked_loss"], kohya["ss_alpha_mask"]) == ("True", "False")
    assert mask_metadata(config) == {
        "sat_unmasked_weight": "0.1", "sat_normalize_masked_area_loss": "True", "sat_face_masks": "True",
        "sat_face_mask_margin": "0.4", "sat_guide_within_mask": "True"}
    plain = kohya_training_metadata(tiny_config(tmp_path), 2, 1, 2, SD15())
    assert (plain["ss_masked_loss"], plain["ss_alpha_mask"]) == ("False", "False")
    assert mask_metadata(tiny_config(tmp_path)) == {}


# ----------------------------------------------------------------------------- resume


def test_a_killed_masked_run_resumes_to_the_uninterrupted_result(tmp_path):
    """--face_masks --guide_within_mask --unmasked_weight --normalize_masked_area_loss under SAC, SIGKILLed while
    writing checkpoint-4, resumed: the uninterrupted run's LoRA bit for bit (the masks come from the files written
    by the first run, reused)."""
    pytest.importorskip("cv2")
    options = dict(guide="sac", face_masks=True, guide_within_mask=True, unmasked_weight=0.1,
                   normalize_masked_area_loss=True, guide_threshold="mean")
    expected = load_file(train(tiny_config(tmp_path / "straight", max_train_steps=6, **options)))
    flags = ["--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
             "--seed", "0", "--report_to", "none", "--random_flip", "--max_train_steps", "6",
             "--checkpointing_steps", "2", "--guide", "sac", "--face_masks", "--guide_within_mask",
             "--unmasked_weight", "0.1", "--normalize_masked_area_loss", "--guide_threshold", "mean",
             "--output_dir", str(tmp_path / "crashy")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    killed = subprocess.run([sys.executable, "-m", "sat_train", *flags], capture_output=True, text=True, cwd=REPO,
                            env={**env, "SAT_TEST_KILL_AT": "checkpoint-4:mid"}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "sat_train", *flags, "--resume_from_checkpoint", "latest"],
                             capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "0 made, 6 reused" in resumed.stdout
    got = load_file(tmp_path / "crashy" / LORA_FILE)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
