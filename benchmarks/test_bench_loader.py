"""The bucketed data loader against the training step it feeds (issue 12): is the loader a bottleneck?

A kohya-style folder of the bundled demo photos at their size (128x128) and as 2:3 portraits and
3:2 landscapes made from them (128x192, 192x128), 10 repeats each, read with --enable_bucket at the
demo's --resolution 128 (buckets 96..256 px in steps of 32) and batch 2, in this process
(--dataloader_num_workers 0, the default). ``loader_ms`` is one batch from the loader: open, decode,
resize-to-cover, crop, flip, tokenize, collate; ``step_ms`` one SAC step of the demo model on such a
batch: VAE and text encoding, the guide's two forwards, backward. ``loader_over_step`` is their
ratio; well under 1 means the loader is not what a run waits on.
"""

from __future__ import annotations

import itertools
import json

import torch
from conftest import device_name, interleaved_medians, record, run_ours
from PIL import Image

from sat_train.guide.capture import resolve_backend, stock_processor
from sat_train.config.settings import TrainConfig
from sat_train.data.dataset import build_dataset
from sat_train.data.records import read_records
from sat_train.demo import DEMO_DATA_DIR, build_components
from sat_train.guide.guidance import build_guide
from sat_train.models.lora import add_lora
from sat_train.run.inputs import make_step_inputs
from sat_train.run.prepare import make_dataloader

SHAPES = {"square": None, "portrait": (128, 192), "landscape": (192, 128)}


def kohya_folder(root):
    """10_square/, 10_portrait/, 10_landscape/: each demo photo, its caption, at the three shapes."""
    rows = [json.loads(line) for line in (DEMO_DATA_DIR / "metadata.jsonl").read_text().splitlines()]
    captions = {row["file_name"]: row["text"] for row in rows}
    for shape, size in SHAPES.items():
        folder = root / f"10_{shape}"
        folder.mkdir(parents=True)
        for name, caption in captions.items():
            with Image.open(DEMO_DATA_DIR / name) as photo:
                (photo if size is None else photo.resize(size, Image.LANCZOS)).save(folder / name)
            (folder / name).with_suffix(".txt").write_text(caption)
    return root


def test_bucketed_loader_vs_train_step(benchmark, tmp_path):
    device = torch.device("cpu")  # the loader runs on the host whatever the step's device
    # a model path only to pass validate() (own data needs one); the demo model is built below
    config = TrainConfig(pretrained_model_name_or_path="demo", train_data_dir=str(kohya_folder(tmp_path / "data")),
                         caption_extension=".txt", resolution=128, enable_bucket=True, min_bucket_reso=96,
                         max_bucket_reso=256, bucket_reso_steps=32, train_batch_size=2, random_flip=True, seed=0,
                         output_dir=str(tmp_path / "out"), report_to="none").validate()
    components = build_components()
    records, names = read_records(config, quiet=True)
    dataset = build_dataset(config, records, names, components.tokenizers, components.family, seed=0)
    loader = make_dataloader(config, dataset, seed=0)
    epochs = itertools.count()

    def batches():
        for epoch in epochs:
            loader.batch_sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            yield from loader

    stream = batches()
    step_batch = next(b for b in loader if b["pixel_values"].shape[-2:] == (160, 96))  # a portrait bucket

    for model in (components.unet, components.vae, components.text_encoder):
        model.requires_grad_(False)
    add_lora(components.unet, config.rank)
    backend = resolve_backend("auto", device)
    components.unet.set_attn_processor(stock_processor(backend))
    guide = build_guide(config, components.unet, components.noise_scheduler)
    components.unet.train()

    def load_batch():
        next(stream)

    def train_step():
        inputs = make_step_inputs(step_batch, components, config, torch.float32, torch.Generator().manual_seed(0))
        guide(components.unet, inputs).loss.backward()
        components.unet.zero_grad(set_to_none=True)

    times = interleaved_medians({"loader": load_batch, "step": train_step}, device, min_run_time=5.0)
    run_ours(benchmark, load_batch, device)
    record(benchmark, f"bucketed loader vs SAC step, demo model, batch 2 [{device_name(device)}]",
           buckets=len(set(dataset.buckets)), loader_ms=times["loader"] * 1e3, step_ms=times["step"] * 1e3,
           loader_over_step=times["loader"] / times["step"])
