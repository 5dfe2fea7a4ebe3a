"""Kohya-style folders (``N_name/img.png`` + ``img.txt``), kohya's caption flags and
--image_interpolation_mode: folders written here with PIL, expectations computed here."""

from __future__ import annotations

import io
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import sat_train.data.dataset as data_module
import sat_train.run.prepare as prepare_module
from sat_train.cli import main
from sat_train.config.settings import TrainConfig
from sat_train.errors import UsageError
from sat_train.data.dataset import build_dataset
from sat_train.data.records import read_records
from sat_train.models.family import tokenize
from sat_train.data.datacheck import scan_image_folder
from sat_train.demo import build_components, build_tokenizer, save_components
from sat_train.seeding import derived_generator
from sat_train import train
from sat_train.models.family import SD15
from train_helpers import assert_same_tensors, tiny_config


def photo(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_sample(folder, stem, caption: str | bytes | None, size=(64, 64), seed=0, suffix=".png",
                 caption_suffix=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    photo(size, seed).save(folder / f"{stem}{suffix}")
    if caption is not None:
        data = caption if isinstance(caption, bytes) else caption.encode("utf-8")
        (folder / f"{stem}{caption_suffix}").write_bytes(data)


def kohya_config(tmp_path, folder, **overrides):
    settings = dict(pretrained_model_name_or_path="unused", train_data_dir=str(folder), caption_extension=".txt")
    return tiny_config(tmp_path / "out", **{**settings, **overrides})


def kinds_by_path(report) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for problem in report.problems:
        found.setdefault(os.path.basename(problem.where), set()).add(problem.kind)
    return found


# ----------------------------------------------------------------------------- repeats and captions


def test_repeats_and_captions_from_subfolders(tmp_path):
    root = tmp_path / "data"
    write_sample(root / "3_sks woman", "a", "sks woman, portrait\nsecond line is not the caption", seed=1)
    write_sample(root / "1_other", "b", "a man", seed=2, suffix=".JPG")
    write_sample(root / "faces", "c", "\ufeffa face", seed=3)  # no N_ prefix: once, with a warning; BOM dropped
    config = kohya_config(tmp_path, root, caption_extension="txt")  # no dot: read as ".txt"
    assert config.validate().caption_suffix == ".txt"
    records, names = read_records(config)
    counts = Counter((path.name, caption) for path, caption in records)
    assert counts == {("a.png", "sks woman, portrait"): 3, ("b.JPG", "a man"): 1, ("c.png", "a face"): 1}
    assert len(names) == len(records) == 5 and sum("a.png" in name for name in names) == 3

    dataset = build_dataset(config, records, names, [build_tokenizer()], SD15())
    assert len(dataset) == 5  # an epoch: each image its folder's N times
    served = Counter(tuple(dataset[i]["input_ids"].tolist()) for i in range(len(dataset)))
    tokenizer = build_tokenizer()
    assert served == {tuple(tokenize(tokenizer, [text])[0].tolist()): n
                      for text, n in (("sks woman, portrait", 3), ("a man", 1), ("a face", 1))}

    report = scan_image_folder(root, resolution=64, progress=False, stream=io.StringIO(), caption_suffix=".txt")
    assert kinds_by_path(report) == {"faces": {"no-repeats"}, "a.txt": {"multi-line-caption"}}
    assert report.summary() == (f"data check {root}: 3 usable images of 3 images (5 samples an epoch with "
                                "repeats), 0 skipped, 0 fatal, 2 warnings (1 multi-line-caption, 1 no-repeats)")


def test_a_caption_extension_of_two_dots(tmp_path):
    root = tmp_path / "data"
    write_sample(root / "2_x", "img.001", "tagged", caption_suffix=".wd14.txt")
    (root / "2_x" / "img.001.txt").write_text("another captioner's file")
    (root / "2_x" / "lost.wd14.txt").write_text("no image")
    report = scan_image_folder(root, resolution=64, progress=False, stream=io.StringIO(), caption_suffix=".wd14.txt")
    assert [(p.name, c) for p, c in report.records] == [("img.001.png", "tagged")] * 2
    assert kinds_by_path(report) == {"img.001.txt": {"not-image"}, "lost.wd14.txt": {"orphan-caption"}}


def test_metadata_jsonl_wins_over_subfolders(tmp_path):
    root = tmp_path / "data"
    write_sample(root / "5_x", "ignored", "not read")
    photo().save(root / "top.png")
    (root / "metadata.jsonl").write_text('{"file_name": "top.png", "text": "from metadata"}\n')
    records, _ = read_records(kohya_config(tmp_path, root))
    assert [(path.name, caption) for path, caption in records] == [("top.png", "from metadata")]


# ----------------------------------------------------------------------------- caption flags

TAGS = "sks woman, portrait, smiling, brown hair, outdoors, earrings"


def expected_caption(caption, seed, epoch, index, shuffle=False, keep_tokens=0, dropout=0.0, tag_dropout=0.0):
    """The rule written out: a generator keyed (seed, epoch, index, 2) draws one uniform (drop the
    caption?), a permutation of the movable tags, one uniform per movable tag (drop it?)."""
    generator = derived_generator(seed, epoch, index, 2)
    drop = torch.rand((), generator=generator).item() < dropout
    tags = [t.strip() for t in caption.split(",")]
    front, rest = tags[:keep_tokens], tags[keep_tokens:]
    permutation = torch.randperm(len(rest), generator=generator).tolist()
    uniforms = torch.rand(len(rest), generator=generator).tolist()
    if drop:
        return ""
    if shuffle:
        rest = [rest[p] for p in permutation]
    if shuffle or tag_dropout > 0:
        return ", ".join(front + [tag for tag, u in zip(rest, uniforms) if u >= tag_dropout])
    return caption


def caption_dataset(tmp_path, n=64, caption=TAGS, seed=7, **flags):
    config = tiny_config(tmp_path, **flags)
    records = [(photo(), caption)] * n
    return build_dataset(config, records, [f"sample {i}" for i in range(n)], [build_tokenizer()], SD15(), seed=seed)


@pytest.mark.parametrize("flags", [
    dict(shuffle_caption=True),
    dict(shuffle_caption=True, keep_tokens=2),
    dict(caption_tag_dropout_rate=0.4, keep_tokens=1),
    dict(shuffle_caption=True, caption_dropout_rate=0.3, caption_tag_dropout_rate=0.2, keep_tokens=1),
])
def test_caption_flags_follow_the_seed_epoch_index_rule(tmp_path, flags):
    dataset = caption_dataset(tmp_path, **flags)
    rule = dict(shuffle=flags.get("shuffle_caption", False), keep_tokens=flags.get("keep_tokens", 0),
                dropout=flags.get("caption_dropout_rate", 0.0), tag_dropout=flags.get("caption_tag_dropout_rate", 0.0))
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            assert dataset.caption(index) == expected_caption(TAGS, 7, epoch, index, **rule), (epoch, index)
    # what the text encoder gets is that caption
    tokenizer = build_tokenizer()
    for index in (0, 5):
        assert torch.equal(dataset[index]["input_ids"], tokenize(tokenizer, [dataset.caption(index)])[0])


def test_shuffle_keeps_the_first_tags_and_reorders_per_epoch(tmp_path):
    dataset = caption_dataset(tmp_path, n=200, shuffle_caption=True, keep_tokens=2)
    tags = [t.strip() for t in TAGS.split(",")]
    epoch0 = [dataset.caption(i) for i in range(200)]
    for caption in epoch0:
        got = caption.split(", ")
        assert got[:2] == tags[:2] and sorted(got[2:]) == sorted(tags[2:])
    assert len(set(epoch0)) > 10  # 4! = 24 orders of the four movable tags
    assert len(set(epoch0)) > 1 and any(c != TAGS for c in epoch0)
    # the same (seed, epoch, index): the same caption, whatever the access order or the global generator
    torch.manual_seed(1234)
    again = caption_dataset(tmp_path, n=200, shuffle_caption=True, keep_tokens=2)
    assert [again.caption(i) for i in reversed(range(200))][::-1] == epoch0
    dataset.set_epoch(1)
    epoch1 = [dataset.caption(i) for i in range(200)]
    assert sum(a != b for a, b in zip(epoch0, epoch1)) > 100  # another epoch, another order (P(same) = 1/24)
    other_seed = caption_dataset(tmp_path, n=200, seed=8, shuffle_caption=True, keep_tokens=2)
    assert [other_seed.caption(i) for i in range(200)] != epoch0


def test_dropout_rates_over_many_draws(tmp_path):
    n = 3000
    dropped = caption_dataset(tmp_path, n=n, caption_dropout_rate=0.3)
    empty = sum(dropped.caption(i) == "" for i in range(n)) / n
    assert abs(empty - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n), empty
    assert all(dropped.caption(i) in ("", TAGS) for i in range(50))  # no shuffle asked: the caption unchanged

    tagged = caption_dataset(tmp_path, n=n, caption_tag_dropout_rate=0.25, keep_tokens=1)
    tags = [t.strip() for t in TAGS.split(",")]
    kept = Counter()
    for i in range(n):
        got = tagged.caption(i).split(", ")
        assert got[0] == tags[0]  # --keep_tokens 1: the first tag is never dropped
        assert got == [t for t in tags if t in got]  # no shuffle: the order of the tags kept
        kept.update(got[1:])
    for tag in tags[1:]:
        assert abs(kept[tag] / n - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n), (tag, kept[tag])
    assert all(caption_dataset(tmp_path, n=20, caption_dropout_rate=1.0).caption(i) == "" for i in range(20))


def test_cac_positions_are_found_in_the_shuffled_caption(tmp_path):
    caption = "portrait, face, smiling, hair, outdoors"
    dataset = caption_dataset(tmp_path, n=40, caption=caption, guide="cac", cac_words="face,hair",
                              shuffle_caption=True, caption_dropout_rate=0.2)
    tokenizer = build_tokenizer()
    seen = set()
    for index in range(len(dataset)):
        item = dataset[index]
        text = expected_caption(caption, 7, 0, index, shuffle=True, dropout=0.2)
        tokens = tokenizer.convert_ids_to_tokens(tokenize(tokenizer, [text])[0].tolist())
        where = [p for p, token in enumerate(tokens) if token in ("face</w>", "hair</w>")]
        assert item["cac_tokens"].tolist() == where, (index, text)
        assert len(where) == (0 if text == "" else 2)
        seen.add(tuple(where))
    unshuffled = [p for p, t in enumerate(tokenizer.convert_ids_to_tokens(tokenize(tokenizer, [caption])[0].tolist()))
                  if t in ("face</w>", "hair</w>")]
    assert len(seen) > 3 and seen != {tuple(unshuffled)}


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("argv, fragment", [
    (["--caption_dropout_rate", "-0.1"], "--caption_dropout_rate is a probability"),
    (["--caption_dropout_rate", "1.5"], "--caption_dropout_rate is a probability"),
    (["--caption_tag_dropout_rate", "nan"], "--caption_tag_dropout_rate is a probability"),
    (["--keep_tokens", "-1", "--shuffle_caption"], "--keep_tokens must be >= 0"),
    (["--keep_tokens", "2"], "add --shuffle_caption or --caption_tag_dropout_rate"),
    (["--caption_extension", "."], "--caption_extension '.' cannot name caption files"),
    (["--caption_extension", ".PNG"], "cannot name caption files"),
    (["--image_interpolation_mode", "sinc"], "invalid choice: 'sinc'"),
])
def test_bad_caption_flags_are_one_line_errors(tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(["--pretrained_model_name_or_path", "unused", "--train_data_dir", str(tmp_path),
              "--output_dir", str(tmp_path / "out"), "--report_to", "none", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "nearest_exact": Image.Resampling.NEAREST,
               "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
               "lanczos": Image.Resampling.LANCZOS}


@pytest.mark.parametrize("mode", [None, *PIL_FILTERS])
def test_interpolation_mode_is_the_resize_filter(tmp_path, mode):
    image = photo((90, 60), seed=4)
    flags = {} if mode is None else {"image_interpolation_mode": mode}
    config = tiny_config(tmp_path, resolution=24, center_crop=True, random_flip=False, **flags)
    dataset = build_dataset(config, [(image, "x")], ["x"], [build_tokenizer()], SD15())
    resized = image.resize((36, 24), PIL_FILTERS[mode or "lanczos"])  # default: lanczos, as diffusers
    expected = np.asarray(resized.crop((6, 0, 30, 24)), dtype=np.float32) / 127.5 - 1
    torch.testing.assert_close(dataset[0]["pixel_values"], torch.from_numpy(expected).permute(2, 0, 1))
    assert TrainConfig().image_interpolation_mode == "lanczos"


# ----------------------------------------------------------------------------- the data check


def hostile_kohya_folder(tmp_path):
    root = tmp_path / "data"
    good = root / "2_good"
    write_sample(good, "a", "a face", seed=1)
    write_sample(good, "b", "a face, smiling", seed=2)
    write_sample(good, "nocap", None)  # no caption file: skipped
    write_sample(good, "latin1", b"caf\xe9 au lait")  # not UTF-8: skipped
    write_sample(good, "blank", "  \n")  # empty caption: kept, trained unconditionally
    (good / "zero.png").write_bytes(b"")
    (good / "zero.txt").write_text("zero")
    buffer = io.BytesIO()
    photo((80, 80), seed=5).save(buffer, format="JPEG")
    (good / "truncated.jpg").write_bytes(buffer.getvalue()[:700])
    (good / "truncated.txt").write_text("truncated")
    (good / "notes.md").write_text("not an image")
    (good / "ghost.txt").write_text("a caption without its image")
    (good / "sub").mkdir()
    (root / "3_empty").mkdir()
    write_sample(root / "faces", "c", "no prefix", seed=3)
    photo().save(root / "stray.png")  # beside the subfolders: ignored
    return root


def test_every_kohya_problem_named_with_its_path(tmp_path):
    root = hostile_kohya_folder(tmp_path)
    stream = io.StringIO()
    report = scan_image_folder(root, resolution=64, progress=False, stream=stream, caption_suffix=".txt")
    assert kinds_by_path(report) == {
        "nocap.png": {"no-caption"}, "latin1.txt": {"bad-caption"}, "blank.txt": {"empty-caption"},
        "zero.png": {"zero-byte"}, "truncated.jpg": {"unreadable"}, "notes.md": {"not-image"},
        "ghost.txt": {"orphan-caption"}, "sub": {"nested-folder"}, "3_empty": {"empty-folder"},
        "faces": {"no-repeats"}, "stray.png": {"outside-subfolder"}}
    assert sorted({(p.name, c) for p, c in report.records}) == [
        ("a.png", "a face"), ("b.png", "a face, smiling"), ("blank.png", ""), ("c.png", "no prefix")]
    assert len(report.records) == 2 + 2 + 2 + 1
    lines = stream.getvalue().strip().splitlines()
    for name, text in (("nocap.png", "has no caption file nocap.txt"), ("latin1.txt", "is not UTF-8"),
                       ("zero.png", "empty (0 bytes)"), ("truncated.jpg", "cannot read image"),
                       ("notes.md", "neither an image"), ("3_empty", "holds no images"),
                       ("faces", "no repeat-count prefix"), ("stray.png", "not in an N_name subfolder")):
        assert any(str(root) in line and name in line and text in line for line in lines), (name, lines)
    assert lines[-1] == (f"data check {root}: 4 usable images of 8 images (7 samples an epoch with repeats), "
                         "4 skipped (1 bad-caption, 1 no-caption, 1 unreadable, 1 zero-byte), 0 fatal, "
                         "7 warnings (1 empty-caption, 1 empty-folder, 1 nested-folder, 1 no-repeats, "
                         "1 not-image, 1 orphan-caption, 1 outside-subfolder)")


def test_a_folder_that_cannot_be_listed_is_skipped_by_name(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_sample(root / "1_ok", "a", "a face")
    write_sample(root / "2_locked", "b", "b")
    locked, real_iterdir = root / "2_locked", type(root).iterdir

    def iterdir(self):  # as chmod 000 does for a user other than root (the tests may run as root)
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(type(root), "iterdir", iterdir)
    report = scan_image_folder(root, resolution=64, progress=False, stream=io.StringIO(), caption_suffix=".txt")
    assert [(p.name, c) for p, c in report.records] == [("a.png", "a face")]
    assert [(os.path.basename(p.where), p.kind, p.skipped) for p in report.problems] == [
        ("2_locked", "unreadable", True)]
    assert "cannot list folder" in report.problems[0].message and "Permission denied" in report.problems[0].message
    with pytest.raises(UsageError, match=r"2_locked.*--strict_data"):
        scan_image_folder(root, resolution=64, progress=False, stream=io.StringIO(), caption_suffix=".txt",
                          strict=True)


def test_symlink_loops_are_skipped_by_name(tmp_path):
    root = tmp_path / "data"
    folder = root / "1_ok"
    write_sample(folder, "a", "a face")
    (folder / "loop.png").symlink_to(folder / "loop2.png")
    (folder / "loop2.png").symlink_to(folder / "loop.png")
    photo().save(folder / "c.png")
    (folder / "c.txt").symlink_to(folder / "c.txt")
    report = scan_image_folder(root, resolution=64, progress=False, stream=io.StringIO(), caption_suffix=".txt")
    assert [(p.name, c) for p, c in report.records] == [("a.png", "a face")]
    assert kinds_by_path(report) == {"loop.png": {"unreadable"}, "loop2.png": {"unreadable"},
                                     "c.txt": {"bad-caption"}}
    assert all(p.skipped and "symlink loop" in p.message for p in report.problems)


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded despite fatal data problems")


def run_main(tmp_path, root, *extra):
    with pytest.raises(SystemExit) as exit_info:
        main(["--pretrained_model_name_or_path", str(tmp_path / "unused"), "--train_data_dir", str(root),
              "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--resolution", "64",
              "--caption_extension", ".txt", *extra])
    return exit_info.value.code


def test_strict_data_makes_skipped_images_fatal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare_module, "load_components", no_model)
    root = hostile_kohya_folder(tmp_path)
    assert run_main(tmp_path, root, "--strict_data") == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sat-train: error:"), err
    assert "latin1.txt" in err and "--strict_data" in err and "and 3 more problems listed above" in err, err
    assert "0 skipped, 4 fatal (1 bad-caption, 1 no-caption, 1 unreadable, 1 zero-byte)" in captured.out
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize("case, fragment", [
    ("image_link", "leaves the data folder"),
    ("folder_link", "leaves the data folder"),
    ("caption_link", "leaves the data folder"),
    ("zero_repeats", "repeats its images 0 times"),
    ("only_empty_folders", "its subfolders hold no images"),
    ("all_skipped", "no usable samples"),
    ("wrong_extension", "pass --caption_extension .caption"),
])
def test_fatal_kohya_data_exits_2_naming_the_path(tmp_path, capsys, monkeypatch, case, fragment):
    monkeypatch.setattr(prepare_module, "load_components", no_model)
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    write_sample(outside, "o", "outside")
    write_sample(root / "1_ok", "a", "a face")
    if case == "image_link":
        (root / "1_ok" / "link.png").symlink_to(outside / "o.png")
        (root / "1_ok" / "link.txt").write_text("x")
        named = "link.png"
    elif case == "folder_link":
        (root / "4_linked").symlink_to(outside, target_is_directory=True)
        named = "4_linked"
    elif case == "caption_link":
        photo().save(root / "1_ok" / "c.png")
        (root / "1_ok" / "c.txt").symlink_to(outside / "o.txt")
        named = "c.txt"
    elif case == "zero_repeats":
        write_sample(root / "0_never", "z", "z")
        named = "0_never"
    elif case == "only_empty_folders":
        for path in (root / "1_ok").iterdir():
            path.unlink()
        (root / "2_more").mkdir()
        named = str(root)
    elif case == "all_skipped":
        (root / "1_ok" / "a.txt").unlink()
        named = "a.png"
    else:  # captions written as .caption, read with --caption_extension .txt
        (root / "1_ok" / "a.txt").rename(root / "1_ok" / "a.caption")
        named = "a.png"
    assert run_main(tmp_path, root) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sat-train: error:"), err
    assert fragment in err and named in err, err
    assert "Traceback" not in captured.out + captured.err


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return str(save_components(build_components(), tmp_path_factory.mktemp("model") / "tiny-sd"))


@pytest.mark.parametrize("guide", ["sac", "cac"])
def test_training_run_on_a_kohya_folder(tmp_path, capsys, monkeypatch, tiny_sd, guide):
    root = tmp_path / "data"
    write_sample(root / "3_sks woman", "a", "sks woman, face, smiling", size=(96, 64), seed=1)
    write_sample(root / "1_street", "b", "a street, cars", size=(64, 80), seed=2)
    config = kohya_config(tmp_path, root, pretrained_model_name_or_path=tiny_sd, guide=guide, cac_words="face",
                          shuffle_caption=True, keep_tokens=1, max_train_steps=2)
    served = []
    original = data_module.CaptionedImages.__getitem__

    def spy(self, index):
        item = original(self, index)
        served.append((self.epoch, index, item))
        return item

    monkeypatch.setattr(data_module.CaptionedImages, "__getitem__", spy)
    lora = train(config)
    assert lora.is_file()
    tokenizer = build_tokenizer()
    captions = ["a street, cars"] + ["sks woman, face, smiling"] * 3  # folders in name order: 1_street, 3_sks woman
    assert sorted(index for _, index, _ in served) == [0, 1, 2, 3]  # 2 steps x batch 2: one epoch of 4 samples
    for epoch, index, item in served:
        text = expected_caption(captions[index], 0, epoch, index, shuffle=True, keep_tokens=1)
        assert torch.equal(item["input_ids"], tokenize(tokenizer, [text])[0]), (index, text)
        assert item["pixel_values"].shape == (3, 64, 64)
        if guide == "cac":
            tokens = tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
            assert item["cac_tokens"].tolist() == [p for p, t in enumerate(tokens) if t == "face</w>"]
    out = capsys.readouterr().out
    assert "2 usable images of 2 images (4 samples an epoch with repeats)" in out
    if guide == "cac":
        assert "CAC: 1 of 4 samples had none of --cac_words (face)" in out, out


def test_resume_with_caption_flags_matches_uninterrupted_run(tmp_path, tiny_sd):
    import random

    from safetensors.torch import load_file

    root = tmp_path / "data"
    write_sample(root / "2_sks woman", "a", "sks woman, face, smiling, brown hair", size=(72, 64), seed=1)
    write_sample(root / "2_street", "b", "a street, cars, night, rain", size=(64, 72), seed=2)
    common = dict(pretrained_model_name_or_path=tiny_sd, guide="none", checkpointing_steps=3, shuffle_caption=True,
                  keep_tokens=1, caption_dropout_rate=0.3, caption_tag_dropout_rate=0.3)
    # 4 samples, batch 2: 2 steps an epoch; the resume at step 3 is mid-epoch, step 5 starts another epoch
    straight = train(kohya_config(tmp_path / "straight", root, max_train_steps=5, **common))
    interrupted = tmp_path / "resumed"
    train(kohya_config(interrupted, root, max_train_steps=3, **common))
    random.seed(99)
    torch.manual_seed(99)  # a resumed run starts in a new process: the global generators are elsewhere
    resumed = train(kohya_config(interrupted, root, max_train_steps=5, resume_from_checkpoint="latest", **common))
    expected, got = load_file(straight), load_file(resumed)
    assert_same_tensors(got, expected)
