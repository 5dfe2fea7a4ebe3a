"""--dataset_name against the real ``datasets`` library, on datasets written here (offline, no hub)."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

datasets = pytest.importorskip("datasets")

import sat_train.data.dataset as data_module  # noqa: E402
from sat_train.cli import main  # noqa: E402
from sat_train.errors import UsageError  # noqa: E402
from sat_train.data.dataset import DatasetRow, build_dataset
from sat_train.data.records import read_records
from sat_train.models.family import tokenize  # noqa: E402
from sat_train.demo import build_components, build_tokenizer, save_components  # noqa: E402
from sat_train import train  # noqa: E402
from sat_train.models.family import SD15
from train_helpers import assert_same_tensors, tiny_config  # noqa: E402

CAPTIONS = ["a photo of a face", "a woman with short brown hair", "a man, eyes", "a portrait"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may reach the network: the environment variables, and the module constants that
    datasets and huggingface_hub read from them at import time (possibly before this test)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return str(save_components(build_components(), tmp_path_factory.mktemp("model") / "tiny-sd"))


def photos(n: int, size=(64, 64), seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def write_parquet(folder, images, captions, split: str = "train"):
    """A local dataset folder as diffusers users have them: {split}.parquet with an Image column."""
    folder.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_dict({"image": images, "text": captions})
    table.cast_column("image", datasets.Image()).to_parquet(folder / f"{split}.parquet")
    return folder


def hf_config(tmp_path, dataset_name, **overrides):
    settings = dict(pretrained_model_name_or_path="unused", dataset_name=str(dataset_name),
                    cache_dir=str(tmp_path / "hf-cache"))
    return tiny_config(tmp_path / "out", **{**settings, **overrides})


def pixels_of(image) -> np.ndarray:
    return np.array(image.convert("RGB"), dtype=np.uint8)


def test_training_run_reads_images_and_captions_from_dataset_name(tmp_path, monkeypatch, tiny_sd):
    images = photos(4)
    folder = write_parquet(tmp_path / "faces", images, CAPTIONS)
    config = hf_config(tmp_path, folder, pretrained_model_name_or_path=tiny_sd, center_crop=True,
                       random_flip=False, max_train_steps=2, guide="none")  # the guide plays no part in data
    records, names = read_records(config)
    assert [caption for _, caption in records] == CAPTIONS
    for (source, _), image in zip(records, images, strict=True):
        assert isinstance(source, DatasetRow)  # decoded per sample, not held in memory
        assert np.array_equal(pixels_of(source.open()), pixels_of(image))
    assert names[2] == f"row 2 of --dataset_name {folder}"

    served = {}  # every sample the run's data loader drew, by index
    original = data_module.CaptionedImages.__getitem__

    def spy(self, index):
        served[index] = item = original(self, index)
        return item

    monkeypatch.setattr(data_module.CaptionedImages, "__getitem__", spy)
    lora = train(config)
    assert sorted(served) == [0, 1, 2, 3]  # 2 steps x batch 2 = one epoch of the 4 rows
    tokenizer = build_tokenizer()
    for index, item in served.items():
        # 64 px images at --resolution 64, center crop, no flip: the pixels unchanged, scaled to [-1, 1]
        expected = torch.from_numpy(pixels_of(images[index])).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(item["pixel_values"], expected, rtol=0, atol=1e-6)
        assert torch.equal(item["input_ids"], tokenize(tokenizer, [CAPTIONS[index]])[0])
    assert lora.is_file() and len(load_file(lora)) > 0
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["dataset_name"] == str(folder) and saved["resolved"]["demo"] is False


@pytest.mark.parametrize("layout", ["imagefolder builder + --train_data_dir", "folder with metadata.jsonl"])
def test_image_folder_through_datasets(tmp_path, layout):
    folder = tmp_path / "pics"
    folder.mkdir()
    images = photos(3, size=(48, 40))
    lines = []
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    if layout.startswith("imagefolder"):
        config = hf_config(tmp_path, "imagefolder", train_data_dir=str(folder))
    else:
        config = hf_config(tmp_path, folder)
    records, _ = read_records(config)
    got = {caption: pixels_of(source.open()) for source, caption in records}
    assert sorted(got) == sorted(CAPTIONS[:3])
    for i, image in enumerate(images):
        assert np.array_equal(got[CAPTIONS[i]], pixels_of(image))


def test_max_train_samples_keeps_the_first_rows(tmp_path):
    folder = write_parquet(tmp_path / "faces", photos(4), CAPTIONS)
    records, names = read_records(hf_config(tmp_path, folder, max_train_samples=2))
    assert [caption for _, caption in records] == CAPTIONS[:2] and len(names) == 2


@pytest.mark.parametrize("flag, value, fragments", [
    ("image_column", "picture", ["no column 'picture'", "(columns: image, text)", "pass --image_column"]),
    ("caption_column", "caption", ["no column 'caption'", "(columns: image, text)", "pass --caption_column"]),
    ("image_column", "text", ["--image_column text", "not images", "(columns: image, text)"]),
])
def test_wrong_column_is_a_usage_error_naming_the_columns(tmp_path, flag, value, fragments):
    folder = write_parquet(tmp_path / "faces", photos(2), CAPTIONS[:2])
    with pytest.raises(UsageError) as error:
        read_records(hf_config(tmp_path, folder, **{flag: value}))
    for fragment in fragments:
        assert fragment in str(error.value)


def caption_picks(dataset, tokenizer, options, epochs: int) -> list[list[int]]:
    """[epoch][index] → which of the row's captions the sample's input_ids spell."""
    picks = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        row = []
        for index in range(len(dataset)):
            ids = dataset[index]["input_ids"]
            matches = [k for k, caption in enumerate(options[index])
                       if torch.equal(ids, tokenize(tokenizer, [caption])[0])]
            assert len(matches) == 1, (epoch, index)
            row.append(matches[0])
        picks.append(row)
    return picks


def test_caption_lists_pick_one_per_epoch_from_seed_epoch_index(tmp_path):
    options = [[f"{word} {i}" for word in ("face", "eyes", "hair", "woman")] for i in range(4)]
    folder = write_parquet(tmp_path / "multi", photos(4), options)
    config = hf_config(tmp_path, folder, center_crop=True, random_flip=False)
    random.seed(1)  # read_records draws nothing from the global generators
    records, names = read_records(config)
    random.seed(2)
    assert [caption for _, caption in records] == [tuple(row) for row in options]
    assert read_records(config)[0][0][1] == records[0][1]
    tokenizer = build_tokenizer()

    first = caption_picks(build_dataset(config, records, names, [tokenizer], SD15(), seed=7), tokenizer, options, epochs=6)
    random.seed(123)
    torch.manual_seed(123)
    again = caption_picks(build_dataset(config, records, names, [tokenizer], SD15(), seed=7), tokenizer, options, epochs=6)
    assert first == again  # the global generators play no part
    assert any(len({epoch[i] for epoch in first}) > 1 for i in range(4)), "a new pick each epoch, as diffusers does"
    other_seed = caption_picks(build_dataset(config, records, names, [tokenizer], SD15(), seed=8), tokenizer, options, epochs=6)
    assert other_seed != first


def test_resume_with_caption_lists_matches_uninterrupted_run(tmp_path, tiny_sd):
    options = [[f"a photo of a face {i}", f"a woman {i}", f"hair and eyes {i}"] for i in range(4)]
    folder = write_parquet(tmp_path / "multi", photos(4, size=(72, 80)), options)
    common = dict(pretrained_model_name_or_path=tiny_sd, dataset_name=str(folder), cache_dir=str(tmp_path / "cache"),
                  guide="none", checkpointing_steps=3)
    # 4 rows, batch 2: 2 steps per epoch; the resume at step 3 is mid-epoch and step 5 starts a new epoch,
    # with new caption picks
    straight = train(tiny_config(tmp_path / "straight", max_train_steps=5, **common))
    interrupted = tmp_path / "resumed"
    train(tiny_config(interrupted, max_train_steps=3, **common))
    random.seed(99)  # a resumed run starts in a new process: the global generator is elsewhere
    resumed = train(tiny_config(interrupted, max_train_steps=5, resume_from_checkpoint="latest", **common))
    expected, got = load_file(straight), load_file(resumed)
    assert_same_tensors(got, expected)


def test_dataset_pickles_without_the_images(tmp_path):
    # spawn/forkserver data loader workers get the dataset by pickle; the images stay in the memory-mapped cache
    images = photos(4, size=(128, 128))
    folder = write_parquet(tmp_path / "faces", images, CAPTIONS)
    config = hf_config(tmp_path, folder)
    records, names = read_records(config)
    blob = pickle.dumps(records)
    assert len(blob) < 128 * 128 * 3  # less than one raw image; the 4 PNGs take ~4x that
    assert np.array_equal(pixels_of(pickle.loads(blob)[3][0].open()), pixels_of(images[3]))
    dataset = build_dataset(config, records, names, [build_tokenizer()], SD15(), seed=3)
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[3]["pixel_values"], dataset[3]["pixel_values"])
    assert copy.describe(3) == f"row 3 of --dataset_name {folder}"


def test_bad_rows_name_the_row(tmp_path):
    folder = write_parquet(tmp_path / "nulls", photos(3), ["a face", None, "eyes"])
    with pytest.raises(UsageError, match=r"row 1 of --dataset_name .*--caption_column text holds None"):
        read_records(hf_config(tmp_path, folder))
    folder = write_parquet(tmp_path / "empty-list", photos(2), [["a face"], []])
    with pytest.raises(UsageError, match=r"row 1 of .*holds \[\], not a caption"):
        read_records(hf_config(tmp_path, folder))
    # a missing image shows when its sample is drawn, named like an image folder's bad file
    folder = write_parquet(tmp_path / "no-image", [photos(1)[0], None], ["a face", "eyes"])
    config = hf_config(tmp_path, folder)
    records, names = read_records(config)
    dataset = build_dataset(config, records, names, [build_tokenizer()], SD15())
    assert dataset[0]["pixel_values"].shape == (3, 64, 64)
    with pytest.raises(UsageError, match=r"cannot read image row 1 of --dataset_name .*no image; fix or remove it"):
        dataset[1]


def only_a_test_split(tmp_path):
    return write_parquet(tmp_path / "test-only", photos(2), CAPTIONS[:2], split="test")


def files_that_disagree(tmp_path):
    folder = write_parquet(tmp_path / "mixed", photos(1), ["one caption"], split="train-0")
    return write_parquet(folder, photos(1), [["a list", "of captions"]], split="train-1")


def empty_dataset(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    empty = datasets.Dataset.from_dict({"image": [], "text": []}, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")}))
    empty.to_parquet(folder / "train.parquet")
    return folder


@pytest.mark.parametrize("make_dataset, extra, fragments", [
    (only_a_test_split, [], ['has no "train" split (splits: test)', "name the files train.*"]),
    (lambda tmp_path: tmp_path / "missing", [], ["cannot load --dataset_name", "missing", "metadata.jsonl"]),
    (lambda tmp_path: "someone/faces", [], ["cannot load --dataset_name someone/faces", "Hub"]),
    (lambda tmp_path: write_parquet(tmp_path / "ok", photos(1), ["a"]), ["--dataset_config_name", "weird"],
     ["cannot load --dataset_name", "--dataset_config_name weird", "'weird' not found"]),
    (files_that_disagree, [], ["cannot load --dataset_name", "generating the dataset (Couldn't cast array of type"]),
    (empty_dataset, [], ["cannot load --dataset_name", "no data"]),
])
def test_dataset_problems_are_one_line_usage_errors(tmp_path, capsys, make_dataset, extra, fragments):
    name = str(make_dataset(tmp_path))
    capsys.readouterr()  # drop the progress bars of writing the dataset
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset_name", name, *extra, "--pretrained_model_name_or_path", "unused", "--cache_dir",
              str(tmp_path / "hf-cache"), "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    # above it only datasets' own progress bars (e.g. "Generating test split"), never a traceback
    assert "Traceback" not in err and err.splitlines()[-1].startswith("sat-train: error:")
    for fragment in fragments:
        assert fragment in err.splitlines()[-1]


def test_missing_datasets_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(UsageError, match="pip install datasets"):
        read_records(hf_config(tmp_path, "someone/faces"))
