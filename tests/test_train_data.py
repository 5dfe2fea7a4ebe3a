"""The image-folder loader against a direct PIL computation."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from sat_train.data.dataset import build_dataset, collate
from sat_train.data.records import read_records
from sat_train.demo import build_tokenizer
from sat_train.models.family import SD15
from train_helpers import DEMO_DATA_DIR, tiny_config


def test_center_crop_pixels_and_tokens_match_pil(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    image.save(tmp_path / "wide.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "wide.png", "words": "a face"}) + "\n")
    config = tiny_config(tmp_path / "out", train_data_dir=str(tmp_path), pretrained_model_name_or_path="x",
                         caption_column="words", resolution=20, center_crop=True, random_flip=False,
                         image_interpolation_mode="bilinear")
    tokenizer = build_tokenizer()
    records, names = read_records(config)
    sample = build_dataset(config, records, names, [tokenizer], SD15())[0]
    expected = np.asarray(image.resize((30, 20), Image.BILINEAR).crop((5, 0, 25, 20)), dtype=np.float32) / 127.5 - 1
    torch.testing.assert_close(sample["pixel_values"], torch.from_numpy(expected).permute(2, 0, 1))
    ids = tokenizer("a face", max_length=77, padding="max_length", truncation=True).input_ids
    assert sample["input_ids"].tolist() == ids


def test_augmentation_depends_on_seed_epoch_index_only():
    config = tiny_config("unused", resolution=64, center_crop=False, random_flip=True)
    records, names = read_records(config, DEMO_DATA_DIR)
    dataset = build_dataset(config, records, names, [build_tokenizer()], SD15(), seed=5)
    first = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    torch.manual_seed(123)  # the global generator plays no part
    again = torch.stack([dataset[i]["pixel_values"] for i in reversed(range(len(dataset)))]).flip(0)
    assert torch.equal(first, again)
    dataset.set_epoch(1)
    other_epoch = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    assert not torch.equal(first, other_epoch)
    batch = collate([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["input_ids"].shape == (2, 77)
