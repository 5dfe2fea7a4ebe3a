"""The data check (sat_train/datacheck.py): hostile image folders are reported in one pass, with
file and line; fatal problems exit 2 before any model loads; bad images are skipped and counted."""

from __future__ import annotations

import io
import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import sat_train.demo
import sat_train.run.prepare as prepare_module
from sat_train.cli import main
from sat_train.errors import UsageError
from sat_train.data.dataset import build_dataset
from sat_train.data.datacheck import scan_image_folder, to_rgb
from sat_train.demo import build_tokenizer
from sat_train.models.family import SD15
from train_helpers import tiny_config


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def rgb(size=(80, 80), color=(200, 100, 50)) -> Image.Image:
    return Image.new("RGB", size, color)


def write_folder(folder, rows, files):
    """rows: dicts (JSON lines) or raw strings; files: {name: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def hostile_files():
    jpeg = image_bytes(rgb(), "JPEG")
    rgba = Image.new("RGBA", (80, 80), (10, 20, 30, 0))  # fully transparent: composited over white
    deep = Image.fromarray(np.full((80, 80), 65535, dtype=np.uint16))  # 16-bit white
    return {
        "good.jpg": jpeg,
        "gray.png": image_bytes(Image.new("L", (80, 80), 90), "PNG"),
        "rgba.png": image_bytes(rgba, "PNG"),
        "cmyk.jpg": image_bytes(Image.new("CMYK", (80, 80), (0, 255, 255, 0)), "JPEG"),
        "deep.png": image_bytes(deep, "PNG"),
        "small.jpg": image_bytes(rgb((32, 48)), "JPEG"),
        "zero.jpg": b"",
        "truncated.jpg": image_bytes(Image.fromarray(
            np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)), "JPEG")[:700],
        "garbage.png": b"this is not a picture at all",
        "nocaption.jpg": jpeg,
        "empty.jpg": jpeg,
    }


ROWS = [  # line numbers: 1-based, blank lines count
    {"file_name": "good.jpg", "text": "a face"},  # 1
    {"file_name": "gray.png", "text": "gray"},  # 2
    {"file_name": "rgba.png", "text": "rgba"},  # 3
    {"file_name": "cmyk.jpg", "text": "cmyk"},  # 4
    {"file_name": "deep.png", "text": "deep"},  # 5
    {"file_name": "small.jpg", "text": "small"},  # 6
    {"file_name": "zero.jpg", "text": "zero"},  # 7
    {"file_name": "truncated.jpg", "text": "truncated"},  # 8
    {"file_name": "garbage.png", "text": "garbage"},  # 9
    {"file_name": "missing.jpg", "text": "missing"},  # 10
    {"file_name": "nocaption.jpg", "caption": "wrong column"},  # 11
    "",  # 12: blank lines are ignored
    {"file_name": "empty.jpg", "text": "  "},  # 13
]
FATAL_ROWS = [
    '{"file_name": "good.jpg", "text": "unterminated',  # 14
    {"file_name": "../outside.jpg", "text": "escape"},  # 15
    {"file_name": "/etc/hostname", "text": "absolute"},  # 16
    "[1, 2]",  # 17
]


def kinds_by_line(report) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for problem in report.problems:
        line = int(problem.where.rsplit(":", 1)[1])
        found.setdefault(line, set()).add(problem.kind)
    return found


def test_every_problem_reported_with_its_line_and_bad_samples_skipped(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", ROWS, hostile_files())
    report = scan_image_folder(folder, resolution=64, progress=False)
    assert kinds_by_line(report) == {
        2: {"converted"}, 3: {"converted"}, 4: {"converted"}, 5: {"converted"}, 6: {"upscaled"}, 7: {"zero-byte"},
        8: {"unreadable"}, 9: {"unreadable"}, 10: {"missing"}, 11: {"no-caption"}, 13: {"empty-caption"}}
    kept = sorted(path.name for path, _ in report.records)
    assert kept == ["cmyk.jpg", "deep.png", "empty.jpg", "good.jpg", "gray.png", "rgba.png", "small.jpg"]
    assert {p.where.rsplit(":", 1)[1] for p in report.skipped} == {"7", "8", "9", "10", "11"}
    out = capsys.readouterr().out
    for line, name in ((7, "zero.jpg"), (8, "truncated.jpg"), (9, "garbage.png"), (10, "missing.jpg"),
                       (11, "nocaption.jpg"), (6, "small.jpg")):
        assert any(f"metadata.jsonl:{line}:" in row and name in row for row in out.splitlines()), (line, out)
    assert "7 usable samples of 12 lines, 5 skipped" in out

    # every kept sample goes through the transform as 3-channel pixels in [-1, 1]
    config = tiny_config(tmp_path / "out", train_data_dir=str(folder), resolution=64)
    dataset = build_dataset(config, report.records, report.names, [build_tokenizer()], SD15())
    pixels = {path.name: dataset[i]["pixel_values"] for i, (path, _) in enumerate(report.records)}
    assert all(p.shape == (3, 64, 64) and p.min() >= -1 and p.max() <= 1 for p in pixels.values())
    assert torch.allclose(pixels["rgba.png"], torch.ones(3, 64, 64))  # transparent → white, not black
    assert torch.allclose(pixels["deep.png"], torch.ones(3, 64, 64))  # 16-bit white stays white


def test_skip_small_and_strict(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", ROWS, hostile_files())
    report = scan_image_folder(folder, resolution=64, skip_small_images=True, progress=False)
    assert "small.jpg" not in {path.name for path, _ in report.records}
    assert "too-small" in {p.kind for p in report.skipped}
    with pytest.raises(UsageError, match=r"metadata.jsonl:6: .*small.jpg.*--strict_data.*and 5 more problems"):
        scan_image_folder(folder, resolution=64, skip_small_images=True, strict=True, progress=False)


def test_to_rgb_conversions():
    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(to_rgb(Image.new("LA", (1, 1), (50, 0))))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(Image.new("L", (1, 1), 7)))[0, 0].tolist() == [7, 7, 7]
    assert to_rgb(Image.new("CMYK", (2, 2))).mode == "RGB"


@pytest.mark.parametrize("case, fragment", [
    ("fatal_lines", "metadata.jsonl:14: not valid JSON"),
    ("all_bad", "no usable samples"),
    ("no_lines", "lists no images"),
])
def test_fatal_data_exits_2_before_any_model_loads(tmp_path, capsys, monkeypatch, case, fragment):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded despite fatal data problems")

    monkeypatch.setattr(prepare_module, "load_components", no_model)
    monkeypatch.setattr(sat_train.demo, "build_components", no_model)
    rows = {"fatal_lines": ROWS + FATAL_ROWS, "all_bad": ROWS[6:11], "no_lines": ["", ""]}[case]
    folder = write_folder(tmp_path / "data", rows, hostile_files())
    (tmp_path / "outside.jpg").write_bytes(image_bytes(rgb(), "JPEG"))  # exists, but outside the folder
    with pytest.raises(SystemExit) as exit_info:
        main(["--pretrained_model_name_or_path", str(tmp_path / "unused"), "--train_data_dir", str(folder),
              "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--resolution", "64"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sat-train: error:") and fragment in err, err
    if case == "fatal_lines":  # all problems of the pass are listed, fatal and not
        assert "and 8 more problems" not in err  # only fatal ones counted in the one line
        assert "and 3 more problems listed above" in err
        out = captured.out
        for line, text in ((14, "not valid JSON"), (15, "leaves the data folder"), (16, "is absolute"),
                           (17, "not an object"), (8, "truncated.jpg"), (10, "missing.jpg")):
            assert any(f"metadata.jsonl:{line}:" in row and text in row for row in out.splitlines()), (line, out)


@pytest.mark.parametrize("strict", [False, True])
def test_summary_counts_fatal_and_skipped_apart(tmp_path, strict):
    # 5 lines: 3 good images, one file_name leaving the folder (fatal), one unreadable image (skipped;
    # fatal with --strict_data): each problem is counted once, under the one heading it belongs to
    files = {f"good{i}.jpg": image_bytes(rgb(), "JPEG") for i in range(3)}
    files["garbage.png"] = b"not a picture"
    rows = [{"file_name": f"good{i}.jpg", "text": "a face"} for i in range(3)]
    rows += [{"file_name": "../outside.jpg", "text": "escape"}, {"file_name": "garbage.png", "text": "bad"}]
    folder = write_folder(tmp_path / "data", rows, files)
    (tmp_path / "outside.jpg").write_bytes(image_bytes(rgb(), "JPEG"))
    stream = io.StringIO()
    with pytest.raises(UsageError):
        scan_image_folder(folder, resolution=64, strict=strict, progress=False, stream=stream)
    summary = stream.getvalue().strip().splitlines()[-1]
    if strict:
        expected = "3 usable samples of 5 lines, 0 skipped, 2 fatal (1 escapes-folder, 1 unreadable)"
    else:
        expected = "3 usable samples of 5 lines, 1 skipped (1 unreadable), 1 fatal (1 escapes-folder)"
    assert summary == f"data check {folder}: {expected}", summary


def test_report_lists_fatal_and_skipped_apart(tmp_path):
    folder = write_folder(tmp_path / "data", ROWS, hostile_files())
    report = scan_image_folder(folder, resolution=64, progress=False, stream=io.StringIO())
    assert report.fatal == [] and len(report.skipped) == 5
    assert report.summary().endswith(
        "7 usable samples of 12 lines, 5 skipped (1 missing, 1 no-caption, 2 unreadable, 1 zero-byte), 0 fatal, "
        "6 warnings (4 converted, 1 empty-caption, 1 upscaled)"), report.summary()
    with pytest.raises(UsageError):  # --strict_data: the same five problems, now fatal, none skipped
        scan_image_folder(folder, resolution=64, strict=True, progress=False, stream=(stream := io.StringIO()))
    assert stream.getvalue().strip().splitlines()[-1].endswith(
        "7 usable samples of 12 lines, 0 skipped, 5 fatal (1 missing, 1 no-caption, 2 unreadable, 1 zero-byte), "
        "6 warnings (4 converted, 1 empty-caption, 1 upscaled)")


def test_report_carries_each_kept_records_image_size(tmp_path):
    """The data check opens every image anyway: its report holds each kept record's (width, height)."""
    folder = write_folder(tmp_path / "data", ROWS, hostile_files())
    report = scan_image_folder(folder, resolution=64, progress=False, stream=io.StringIO())
    assert len(report.sizes) == len(report.records)
    assert {path.name: size for (path, _), size in zip(report.records, report.sizes)} == {
        "good.jpg": (80, 80), "gray.png": (80, 80), "rgba.png": (80, 80), "cmyk.jpg": (80, 80),
        "deep.png": (80, 80), "small.jpg": (32, 48), "empty.jpg": (80, 80)}


def test_under_several_processes_only_the_main_process_checks_the_data(tmp_path, monkeypatch, capsys):
    """read_run_records: the main process scans the folder and prints the check; another process scans
    nothing and gets the main process's records, names and sizes from the one broadcast (here: rank 0's
    list, pickled and unpickled, as torch.distributed sends it); a fatal data problem stops that process with
    the main process's message, as when every process scanned (the CLI prints it once)."""
    import accelerate.utils

    import sat_train.data.records as records_module
    from sat_train.data.records import read_run_records

    sent: list[bytes] = []

    def broadcast(objects, from_process=0):
        if rank == 0:
            sent.append(pickle.dumps(objects))
            return objects
        objects[:] = pickle.loads(sent.pop(0))
        return objects

    scans = []
    original_scan = records_module.scan_image_folder

    def counting_scan(*args, **kwargs):
        scans.append(rank)
        return original_scan(*args, **kwargs)

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    monkeypatch.setattr(records_module, "scan_image_folder", counting_scan)
    sizes = [(80, 80), (96, 64), (64, 112)]
    folder = write_folder(tmp_path / "data", [{"file_name": f"im{i}.png", "text": f"face {i}"} for i in range(3)],
                          {f"im{i}.png": image_bytes(rgb(size), "PNG") for i, size in enumerate(sizes)})
    config = tiny_config(tmp_path / "out", train_data_dir=str(folder))

    rank = 0
    main_records = read_run_records(config, SimpleNamespace(num_processes=2, is_main_process=True))
    assert f"data check {folder}: 3 usable samples of 3 lines" in capsys.readouterr().out
    rank = 1
    other = read_run_records(config, SimpleNamespace(num_processes=2, is_main_process=False))
    assert scans == [0] and capsys.readouterr().out == ""
    assert other.records == [(folder / f"im{i}.png", f"face {i}") for i in range(3)] == main_records.records
    assert other.names == main_records.names and len(other.names) == 3
    assert other.sizes == sizes

    (folder / "metadata.jsonl").write_text("\n\n")
    message = f"{folder / 'metadata.jsonl'} lists no images: add one line per image"
    for rank, is_main in ((0, True), (1, False)):
        with pytest.raises(UsageError) as stop:
            read_run_records(config, SimpleNamespace(num_processes=2, is_main_process=is_main))
        assert str(stop.value) == message
    assert scans == [0, 0]
