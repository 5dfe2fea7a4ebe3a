"""Aspect-ratio buckets (--enable_bucket, kohya-ss/sd-scripts' flags): the bucket table and the
assignment against kohya's rules written out here, the single-bucket batch sampler alone and under
accelerate (two ranks, set_epoch, skip_first_batches), the cover-and-crop transform, the flags,
the data check, end-to-end runs on a kohya-style folder of three aspect ratios, and a SIGKILLed
bucketed run resumed to the uninterrupted weights."""

from __future__ import annotations

import io
import itertools
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sat_train.data.buckets import BucketBatchSampler, assign_bucket, make_buckets, own_size_bucket
from sat_train.cli import build_parser, main, parse_config
from sat_train.config.settings import TrainConfig
from sat_train.errors import UsageError
from sat_train.data.dataset import ImageTransform, build_dataset, collate
from sat_train.data.records import read_records
from sat_train.data.datacheck import scan_image_folder
from sat_train.demo import build_components, build_tokenizer, save_components
from sat_train import train
from sat_train.models.family import SD15
from train_helpers import LORA_FILE, REPO, assert_same_tensors, tiny_config

# ----------------------------------------------------------------------------- the bucket table

TABLES = [((512, 512), 256, 1024, 64), ((768, 512), 256, 1024, 64), ((64, 64), 32, 128, 16),
          ((640, 640), 320, 960, 32)]


@pytest.mark.parametrize("resolution,low,high,steps", TABLES)
def test_bucket_table_properties(resolution, low, high, steps):
    table = make_buckets(resolution, low, high, steps)
    area = resolution[0] * resolution[1]
    assert table == sorted(set(table))
    for w, h in table:
        assert w * h <= area and w % steps == 0 and h % steps == 0
        assert low <= w <= high and low <= h <= high
        assert (h, w) in table  # every bucket's transpose
    # for each width step, the tallest height of at most the area (searched here step by step) is a bucket
    for w in range(low, high + 1, steps):
        heights = [h for h in range(low, high + 1, steps) if w * h <= area]
        if heights:
            assert (w, max(heights)) in table
    # nothing else, but kohya's largest square
    square = max(s for s in range(steps, high + 1, steps) if s * s <= area)
    expected = {(w, max(h for h in range(low, high + 1, steps) if w * h <= area))
                for w in range(low, high + 1, steps) if w * low <= area}
    assert set(table) == expected | {(h, w) for w, h in expected} | {(square, square)}


def test_sd_buckets_hold_the_portrait_shapes_of_the_issue():
    table = make_buckets((512, 512), 256, 1024, 64)
    assert {(512, 512), (384, 640), (640, 384), (448, 576), (256, 1024)} <= set(table)
    # 2:3 (0.667) lies nearest 384x640 (0.6; next: 448x576, 0.778); 3:4 (0.75) nearest 448x576
    assert assign_bucket((2000, 3000), table) == (384, 640)
    assert assign_bucket((3000, 4000), table) == (448, 576)


# ----------------------------------------------------------------------------- assignment


def kohya_select(size, table):
    """kohya's BucketManager.select_bucket without --bucket_no_upscale, written with numpy as kohya does."""
    if tuple(size) in table:
        return tuple(size)
    ratios = np.array([w / h for w, h in table])
    return table[int(np.abs(ratios - size[0] / size[1]).argmin())]


def test_assignment_is_kohyas_closest_aspect_ratio():
    table = make_buckets((512, 512), 256, 1024, 64)
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(100, 4000, size=(500, 2))] + [(384, 640), (512, 512)]
    for size in sizes:
        assert assign_bucket(size, table) == kohya_select(size, table), size


def test_no_upscale_buckets_are_the_image_size_rounded_down():
    steps, area = 64, 512 * 512
    table = make_buckets((512, 512), 256, 1024, steps)
    for size in [(300, 400), (511, 513), (256, 256), (1000, 260)]:  # at most the area: own size, rounded down
        bucket = assign_bucket(size, table, no_upscale=True, area=area, steps=steps)
        assert bucket == (size[0] // steps * steps, size[1] // steps * steps)
    for size in [(2000, 3000), (4000, 1000), (1024, 1024)]:  # larger: shrunk to the area, then rounded down
        w, h = own_size_bucket(size, area, steps)
        assert w % steps == 0 and h % steps == 0 and w <= size[0] and h <= size[1]
        assert w * h <= area * 1.1 and abs(w / h - size[0] / size[1]) < 0.2 * size[0] / size[1]


# ----------------------------------------------------------------------------- the sampler


def sampler_buckets():
    return [(64, 64)] * 7 + [(48, 80)] * 4 + [(80, 48)] * 1 + [(64, 64)] * 2


def test_sampler_epoch_holds_every_index_once_in_single_bucket_batches():
    buckets = sampler_buckets()
    sampler = BucketBatchSampler(buckets, batch_size=3, seed=5)
    counts = Counter(buckets)
    assert len(sampler) == sum(math.ceil(n / 3) for n in counts.values()) == 3 + 2 + 1
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(len(buckets)))
        assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
        assert all(1 <= len(batch) <= 3 for batch in batches)
        # per bucket, the batches are full but for at most one (kohya keeps a bucket's last partial batch)
        for bucket, n in counts.items():
            sizes = sorted((len(b) for b in batches if buckets[b[0]] == bucket), reverse=True)
            assert sizes == [3] * (n // 3) + ([n % 3] if n % 3 else [])
        epochs.append(batches)
    again = BucketBatchSampler(buckets, batch_size=3, seed=5)
    again.set_epoch(1)
    assert list(again) == epochs[1]  # a function of (seed, epoch) alone
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = BucketBatchSampler(buckets, batch_size=3, seed=6)
    assert list(other_seed) != epochs[0]


@pytest.mark.parametrize("num_batches_extra", [0, 1])
def test_two_ranks_get_whole_disjoint_batches_and_equal_counts(num_batches_extra):
    """accelerate's BatchSamplerShard (what accelerator.prepare wraps a batch sampler in under two
    processes) deals whole batches; an odd count is evened out with the epoch's first batches."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard

    buckets = sampler_buckets()[: 12 + num_batches_extra]  # 6 or 7 batches of 2
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0)
    sampler.set_epoch(3)
    everything = list(sampler)
    ranks = [BatchSamplerShard(sampler, num_processes=2, process_index=r, even_batches=True) for r in (0, 1)]
    got = [list(rank) for rank in ranks]
    assert len(got[0]) == len(got[1]) == len(ranks[0]) == math.ceil(len(everything) / 2)
    dealt = [batch for pair in itertools.zip_longest(*got) for batch in pair if batch is not None]
    assert dealt[: len(everything)] == everything  # round-robin, whole batches, same order as the sampler
    assert dealt[len(everything):] == everything[: len(dealt) - len(everything)]  # padding: the first ones
    # DataLoaderShard.set_epoch reaches the sampler inside the shard
    loader = DataLoaderShard(list(range(len(buckets))), batch_sampler=ranks[1])
    loader.set_epoch(7)
    assert sampler.epoch == 7


def test_sampler_through_accelerate_prepare_and_skip_first_batches(tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    buckets = sampler_buckets()
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=1)
    loader = torch.utils.data.DataLoader(list(range(len(buckets))), batch_sampler=sampler)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    prepared = accelerator.prepare(loader)
    assert len(prepared) == len(sampler)
    prepared.set_epoch(2)
    seen = [batch.tolist() for batch in prepared]
    assert seen == sampler.epoch_batches(2)
    assert sampler.epoch == 2
    # as train_epoch does on resume: set_epoch, then skip (the skipping loader sets its epoch, copied
    # from the loader's, on the sampler again when it starts)
    prepared.set_epoch(2)
    skipped = accelerator.skip_first_batches(prepared, 3)
    assert [batch.tolist() for batch in skipped] == seen[3:]


# ----------------------------------------------------------------------------- the transform


def gradient_image(width, height) -> Image.Image:
    """Pixel (x, y) = (x mod 256, y mod 256, 0): crops are readable from the pixels."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x % 256, y % 256, np.zeros_like(x)], axis=-1).astype(np.uint8))


def as_pixels(tensor) -> np.ndarray:
    return ((tensor + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_transform_covers_the_bucket_and_crops():
    transform = ImageTransform(64, center_crop=True, random_flip=False, interpolation="bilinear")
    # taller than the bucket's ratio: no resize (scale max(48/100, 80/80) = 1), the middle 48 columns
    image = gradient_image(100, 80)
    got = as_pixels(transform(image, size=(48, 80)))
    assert got.shape == (80, 48, 3)
    np.testing.assert_array_equal(got, np.asarray(image)[:, 26:74])
    # the bucket's own aspect ratio: a plain resize, nothing cropped
    image = gradient_image(60, 100)
    np.testing.assert_array_equal(as_pixels(transform(image, size=(48, 80))),
                                  np.asarray(image.resize((48, 80), Image.BILINEAR)))
    # without a size: the square --resolution, as before buckets
    assert transform(gradient_image(90, 70)).shape == (3, 64, 64)
    # random crops stay inside the image and follow the generator
    random = ImageTransform(64, center_crop=False, random_flip=False, interpolation="bilinear")
    image = gradient_image(120, 80)
    crops = {random(image, torch.Generator().manual_seed(s), size=(48, 80))[0, 0, 0].item() for s in range(20)}
    assert len(crops) > 1
    torch.testing.assert_close(random(image, torch.Generator().manual_seed(3), size=(48, 80)),
                               random(image, torch.Generator().manual_seed(3), size=(48, 80)))


# ----------------------------------------------------------------------------- a kohya-style folder


SIZES = {"2_square": [(64, 64), (72, 72)], "1_tall": [(60, 100), (66, 110)], "1_wide": [(100, 60)]}
BUCKET_FLAGS = dict(enable_bucket=True, resolution=64, min_bucket_reso=48, max_bucket_reso=128, bucket_reso_steps=16)


def write_folder(root, sizes=SIZES, caption="a photo of a face, eyes"):
    rng = np.random.default_rng(0)
    for sub, shapes in sizes.items():
        (root / sub).mkdir(parents=True)
        for i, (w, h) in enumerate(shapes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / sub / f"im{i}.png")
            (root / sub / f"im{i}.txt").write_text(caption)
    return root


def bucket_config(tmp_path, out="out", **overrides):
    settings = dict(pretrained_model_name_or_path=str(tmp_path / "model"), train_data_dir=str(tmp_path / "data"),
                    caption_extension=".txt", **BUCKET_FLAGS)
    return tiny_config(tmp_path / out, **{**settings, **overrides})


def test_dataset_target_sizes_follow_the_buckets(tmp_path):
    write_folder(tmp_path / "data")
    config = bucket_config(tmp_path, center_crop=True)
    records, names = read_records(config.validate(), quiet=True)
    dataset = build_dataset(config, records, names, [build_tokenizer()], SD15())
    table = config.bucket_resolutions
    assert table == [(48, 80), (64, 64), (80, 48)]
    for index, (path, _) in enumerate(records):
        with Image.open(path) as image:
            expected = kohya_select(image.size, table)
        assert dataset.target_size(index) == expected
        assert dataset[index]["pixel_values"].shape == (3, expected[1], expected[0])
    assert Counter(dataset.buckets) == {(64, 64): 4, (48, 80): 2, (80, 48): 1}
    batch = collate([dataset[i] for i in range(len(dataset)) if dataset.buckets[i] == (48, 80)])
    assert batch["pixel_values"].shape == (2, 3, 80, 48)
    # without buckets: every sample the square --resolution
    square = build_dataset(bucket_config(tmp_path, enable_bucket=False), records, names, [build_tokenizer()], SD15())
    assert square.buckets is None and square.target_size(3) == (64, 64)



def test_no_upscale_dataset_buckets_and_skips(tmp_path):
    """--bucket_no_upscale: 56x56 (at most the 64x64 area) trains at its own size rounded down to 16,
    48x48, a bucket the table does not hold; 40x90 is below --min_bucket_reso 48: skipped."""
    write_folder(tmp_path / "data", {"1_a": [(56, 56), (64, 64), (40, 90), (60, 100)]})
    config = bucket_config(tmp_path, bucket_no_upscale=True, center_crop=True, random_flip=False)
    records, names = read_records(config.validate(), quiet=True)
    assert sorted(p.name for p, _ in records) == ["im0.png", "im1.png", "im3.png"]
    dataset = build_dataset(config, records, names, [build_tokenizer()], SD15())
    got = {path.name: dataset.target_size(i) for i, (path, _) in enumerate(records)}
    assert got == {"im0.png": (48, 48), "im1.png": (64, 64), "im3.png": (48, 80)}  # 60x100 > area: shrunk
    index = [p.name for p, _ in records].index("im0.png")
    with Image.open(records[index][0]) as image:  # 56 -> 48 both ways: a plain downscale, nothing cropped
        expected = np.asarray(image.convert("RGB").resize((48, 48), Image.LANCZOS))
    np.testing.assert_array_equal(as_pixels(dataset[index]["pixel_values"]), expected)


def test_dataset_name_rows_get_buckets_too(tmp_path, monkeypatch):
    """--dataset_name: each row's size is read by decoding it once; the buckets follow kohya's rule."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    rng = np.random.default_rng(1)
    sizes = [(64, 64), (60, 100), (100, 60)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    folder = tmp_path / "rows"
    folder.mkdir()
    table = datasets.Dataset.from_dict({"image": images, "text": ["a face"] * 3})
    table.cast_column("image", datasets.Image()).to_parquet(folder / "train.parquet")
    config = bucket_config(tmp_path, train_data_dir=None, dataset_name=str(folder), cache_dir=str(tmp_path / "c"))
    records, names = read_records(config.validate(), quiet=True)
    dataset = build_dataset(config, records, names, [build_tokenizer()], SD15())
    assert dataset.buckets == [kohya_select(size, config.bucket_resolutions) for size in sizes]
    assert dataset.buckets == [(64, 64), (48, 80), (80, 48)]
    assert dataset[1]["pixel_values"].shape == (3, 80, 48)


def test_latent_cache_holds_each_sample_at_its_bucket(tmp_path):
    """--cache_latents with --enable_bucket: each cached distribution is the VAE's of the uncached
    center crop at the sample's bucket (both flips drawn the same way), so batches stay single-size."""
    from types import SimpleNamespace

    from sat_train.data.dataset import LATENT_PARAMS
    from sat_train.data.latent_cache import cache_latents

    write_folder(tmp_path / "data")
    vae = build_components().vae
    uncached_config = bucket_config(tmp_path, center_crop=True)
    cached_config = bucket_config(tmp_path, cache_latents=True)
    records, names = read_records(cached_config.validate(), quiet=True)
    uncached = build_dataset(uncached_config, records, names, [build_tokenizer()], SD15())
    cached = build_dataset(cached_config, records, names, [build_tokenizer()], SD15())
    quiet = SimpleNamespace(print=lambda *a: None, is_main_process=True, wait_for_everyone=lambda: None)
    cache_latents(cached_config, quiet, vae, cached, torch.float32)
    for index in range(len(cached)):
        w, h = cached.target_size(index)
        params = cached[index][LATENT_PARAMS]
        assert params.shape == (8, h // 8, w // 8)
        with torch.no_grad():
            expected = vae.encode(uncached[index]["pixel_values"][None]).latent_dist.parameters[0]
        torch.testing.assert_close(params, expected, rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("guide", ["none", "sac", "cac"])
def test_bucketed_run_end_to_end(tmp_path, capsys, guide):
    write_folder(tmp_path / "data")
    save_components(build_components(), tmp_path / "model")
    extra = {"mask_preview_steps": 1} if guide != "none" else {}
    config = bucket_config(tmp_path, guide=guide, cac_words="face", max_train_steps=4, **extra)
    lora = train(config)
    out = capsys.readouterr().out
    assert "aspect-ratio buckets (3 in use, 7 samples an epoch with repeats):" in out
    for line in ("bucket 48x80: 2 images", "bucket 64x64: 4 images", "bucket 80x48: 1 images"):
        assert line in out
    weights = load_file(lora)
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    if guide != "none":
        pictures = sorted((tmp_path / "out" / "masks").glob("step*.png"))
        assert len(pictures) == 4
        # one row per sample of image | mask | degraded, each at its batch's bucket size
        # 4 steps = epoch 0's 4 batches: each bucket's (64x64: two batches of 2; 48x80: 2; 80x48: 1)
        assert {Image.open(p).size for p in pictures} == {(3 * 48, 2 * 80), (3 * 64, 2 * 64), (3 * 80, 48)}


def test_a_bucketed_cached_run_opens_each_image_once_for_its_size(tmp_path, monkeypatch):
    """The data check opens (and decodes) every image; its report carries their sizes, which the buckets
    and the latent cache use: a bucketed --cache_latents run opens each of the folder's 5 files twice,
    checked once and encoded once (the 2_square images, listed twice an epoch, too), never again for its size."""
    data = write_folder(tmp_path / "data")
    save_components(build_components(), tmp_path / "model")
    opened: Counter = Counter()
    original = Image.open

    def counting(fp, *args, **kwargs):  # (the module that opens it, the file)
        name = Path(fp).relative_to(data).as_posix() if str(fp).startswith(str(data)) else str(fp)
        opened[sys._getframe(1).f_globals["__name__"], name] += 1
        return original(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    train(bucket_config(tmp_path, guide="none", cache_latents=True))
    files = ["1_tall/im0.png", "1_tall/im1.png", "1_wide/im0.png", "2_square/im0.png", "2_square/im1.png"]
    assert opened == Counter({**{("sat_train.data.datacheck", name): 1 for name in files},
                              **{("sat_train.data.dataset", name): 1 for name in files}})


# ----------------------------------------------------------------------------- crash and resume


def cli_run(tmp_path, out, kill_at: str | None, resume: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    env.pop("SAT_TEST_KILL_AT", None)
    if kill_at:
        env["SAT_TEST_KILL_AT"] = kill_at
    flags = ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir", str(tmp_path / "data"),
             "--caption_extension", ".txt", "--enable_bucket", "--resolution", "64", "--min_bucket_reso", "48",
             "--max_bucket_reso", "128", "--bucket_reso_steps", "16", "--train_batch_size", "2",
             "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none",
             "--random_flip", "--guide", "sac", "--max_train_steps", "6", "--checkpointing_steps", "3",
             "--output_dir", str(out)] + (["--resume_from_checkpoint", "latest"] if resume else [])
    return subprocess.run([sys.executable, "-m", "sat_train", *flags], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_killed_bucketed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """4 single-bucket batches an epoch (buckets of 4, 2 and 1 samples, batch 2): checkpoint-3 lies in
    the middle of epoch 0, so the resume skips 3 batches of the sampler's epoch 0 order, then epoch 1."""
    write_folder(tmp_path / "data")
    save_components(build_components(), tmp_path / "model")
    # the uninterrupted run through the same CLI and environment (thread count included: float sums must match)
    assert cli_run(tmp_path, tmp_path / "straight", None, resume=False).returncode == 0
    expected = load_file(tmp_path / "straight" / LORA_FILE)
    out = tmp_path / "crashy"
    proc = cli_run(tmp_path, out, "checkpoint-3:after", resume=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / LORA_FILE).exists()
    proc = cli_run(tmp_path, out, None, resume=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-3'}" in proc.stdout
    got = load_file(out / LORA_FILE)
    assert_same_tensors(got, expected)


# ----------------------------------------------------------------------------- flags


def test_resolution_width_height(tmp_path):
    config = parse_config(["--resolution", "64,96", "--guide", "none", "--output_dir", str(tmp_path)])
    assert config.resolution_wh == (64, 96)
    assert parse_config(["--resolution", "80", "--output_dir", str(tmp_path)]).resolution == 80  # an int stays one
    transform = build_dataset(config, [(gradient_image(200, 100), "x")], ["x"], [build_tokenizer()], SD15()).transform
    assert transform(gradient_image(200, 100)).shape == (3, 96, 64)  # no buckets: every image W x H


def test_resolution_width_height_reaches_samples_and_kohya_metadata(tmp_path):
    from sat_train.outputs.kohya_metadata import kohya_training_metadata, modelspec_metadata
    from sat_train.outputs.samples import validation_prompt

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a face\na face --w 32 --h 40\n")
    config = parse_config(["--resolution", "64,96", "--guide", "none", "--output_dir", str(tmp_path / "out"),
                           "--validation_prompt", "a face", "--sample_prompts", str(prompts), "--sample_at_first"])
    assert (validation_prompt(config).width, validation_prompt(config).height) == (64, 96)
    assert [(p.width, p.height) for p in config.sample_prompt_list] == [(64, 96), (32, 40)]
    kohya = kohya_training_metadata(config, steps=1, epoch=1, max_train_steps=1, family=SD15())
    assert kohya["ss_resolution"] == "(64, 96)" and kohya["ss_enable_bucket"] == "False"
    assert modelspec_metadata(config, "epsilon", 0.0, SD15())["modelspec.resolution"] == "64x96"


@pytest.mark.parametrize("flags,fragment", [
    (["--resolution", "64,"], "--resolution '64,'"),
    (["--resolution", "0,64"], "--resolution '0,64'"),
    (["--resolution", "64x"], "--resolution '64x'"),
    (["--enable_bucket", "--resolution", "512", "--min_bucket_reso", "1024", "--max_bucket_reso", "512"],
     "--min_bucket_reso 1024 is larger than --max_bucket_reso 512"),
    (["--enable_bucket", "--resolution", "512", "--bucket_reso_steps", "4"], "--bucket_reso_steps must be"),
    (["--enable_bucket", "--resolution", "512", "--bucket_reso_steps", "36"], "--bucket_reso_steps must be"),
    (["--enable_bucket", "--resolution", "2048"], "--resolution 2048 lies outside the bucket sides"),
    (["--enable_bucket", "--resolution", "128"], "--resolution 128 lies outside the bucket sides"),
    (["--enable_bucket", "--resolution", "512", "--min_bucket_reso", "300"], "--min_bucket_reso 300 is not a mult"),
    (["--enable_bucket", "--resolution", "64", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
      "--bucket_reso_steps", "16"], "--min_bucket_reso 32 gives buckets 32 px wide"),
])
def test_bad_resolution_and_bucket_flags_exit_2_with_one_line(tmp_path, capsys, monkeypatch, flags, fragment):
    import sat_train.demo

    monkeypatch.setattr(sat_train.demo, "build_components", lambda: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    with pytest.raises(UsageError):  # the same check when TrainConfig is built in code
        TrainConfig(**{**vars(build_parser().parse_args(flags)), "output_dir": str(tmp_path)}).validate()


# ----------------------------------------------------------------------------- data check


def test_data_check_small_means_below_min_bucket_reso(tmp_path):
    root = write_folder(tmp_path / "data", {"1_a": [(40, 90), (56, 56), (200, 300)]})
    stream = io.StringIO()
    config = bucket_config(tmp_path)
    records, _ = read_records(config.validate(), quiet=True)
    assert len(records) == 3
    from sat_train.data.datacheck import SmallImageRule

    report = scan_image_folder(root, resolution=SmallImageRule(48, 48, "--min_bucket_reso 48"), progress=False,
                               stream=stream, caption_suffix=".txt")
    kinds = {os.path.basename(p.where): p.kind for p in report.problems}
    assert kinds == {"im0.png": "upscaled"}  # 40 < 48; 56x56 is below --resolution 64 but no bucket upscales it
    assert "smaller than --min_bucket_reso 48: upscaled (pass --skip_small_images" in report.problems[0].message
    skipping = bucket_config(tmp_path, bucket_no_upscale=True)
    records, _ = read_records(skipping.validate(), quiet=True)
    assert sorted(p.name for p, _ in records) == ["im1.png", "im2.png"]


# ----------------------------------------------------------------------------- two processes


def test_two_processes_train_whole_bucket_batches_in_step(tmp_path):
    """torchrun, 2 CPU processes (gloo): 4 single-bucket batches an epoch, 2 per rank, so 2 steps an
    epoch on each; unequal counts would leave one rank waiting in DDP's all-reduce (the run would hang
    or fail). The bucket table is printed once."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    write_folder(tmp_path / "data")
    save_components(build_components(), tmp_path / "model")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    env.pop("SAT_TEST_KILL_AT", None)
    out = tmp_path / "out"
    flags = ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir", str(tmp_path / "data"),
             "--caption_extension", ".txt", "--enable_bucket", "--resolution", "64", "--min_bucket_reso", "48",
             "--max_bucket_reso", "128", "--bucket_reso_steps", "16", "--train_batch_size", "2", "--seed", "0",
             "--report_to", "none", "--guide", "sac", "--max_train_steps", "4", "--output_dir", str(out)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sat_train", *flags], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("aspect-ratio buckets (3 in use") == 1
    summary = [line for line in proc.stdout.splitlines() if line.startswith("sat_train: guide=sac")]
    assert len(summary) == 1 and "4 steps" in summary[0] and "x 2 processes" in summary[0]
    assert (out / LORA_FILE).is_file()
