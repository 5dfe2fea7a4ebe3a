"""The data check: one pass over an image folder before any model loads.

``scan_image_folder`` reads ``metadata.jsonl`` and fully decodes every image it names (so a
truncated file fails here, not hours into a run), with a tqdm progress bar on terminals; its report
keeps each record's image size (``DataReport.sizes``), so the buckets and the latent cache need not
open every image again. Every
problem is collected with its ``metadata.jsonl:LINE`` and file, all in one pass, then printed
together; the run then either stops (exit code 2, one line on stderr) or goes on without the bad
samples. The summary line counts the three kinds below apart ("N skipped (...), N fatal (...),
N warnings (...)"), as do ``DataReport.skipped`` / ``.fatal`` / ``.warnings``:

fatal (UsageError, exit 2)
    a ``metadata.jsonl`` line that is not a JSON object, or has no file-name key; a ``file_name``
    that is absolute or leaves the data folder (``../``, or a symlink pointing out); no usable
    sample left; no sample at all with the caption column (wrong ``--caption_column``); with
    ``--strict_data``, any skipped sample.
skipped
    a missing, zero-byte, unreadable, corrupt or truncated image; a caption that is missing or not
    a string; with ``--skip_small_images``, an image smaller than ``--resolution`` (with
    ``--enable_bucket``: than ``--min_bucket_reso``, also skipped with ``--bucket_no_upscale``).
kept, with a note (warnings)
    an empty caption (trained unconditionally); a grayscale / palette / RGBA / CMYK / 16-bit image
    (converted to RGB by ``to_rgb``); an image smaller than ``--resolution`` / ``--min_bucket_reso`` (upscaled).

A folder without ``metadata.jsonl`` but with subfolders is read kohya-style (``scan_kohya_folder``:
``N_name/img.jpg`` + ``img.caption``, each image N times an epoch), with the same three kinds and
one summary; there a problem's place is the path of its file or folder.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UsageError
from .subsets import Subset, folder_subset

# suffixes read as images (the data check's and the kohya-style folder reader's)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

METADATA = "metadata.jsonl"
SHOWN_PER_KIND = 20  # at most this many lines per kind of problem are printed; the summary counts all


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → 8-bit RGB: 16/32-bit integer and float grayscale are scaled (not clipped),
    transparency is composited over white, CMYK/palette/L go through PIL's conversion."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            top = 65535.0
        elif image.mode == "F":  # floats: [0, 1], or [0, peak] when larger
            top = max(float(np.nanmax(values)) if values.size else 1.0, 1.0)
        else:  # 32-bit "I": PIL opens 16-bit PNGs this way too
            top = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.nan_to_num(values / top * 255.0), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class Problem:
    where: str  # "path/metadata.jsonl:LINE" (or the image path)
    kind: str  # short key: "not-json", "escapes-folder", "unreadable", "converted", ...
    message: str
    fatal: bool = False
    skipped: bool = False

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class DataReport:
    """What the scan found: usable records, their names and image sizes, and every problem (in file order)."""

    root: Path
    records: list[tuple[Path, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # each record's image (width, height)
    problems: list[Problem] = field(default_factory=list)
    lines: int = 0  # metadata.jsonl lines read; kohya-style folders: images found
    kohya: bool = False  # read from N_name/ subfolders (records repeat each image N times)
    usable_images: int = 0  # kohya-style: images kept, each counted once
    # kohya-style: each kept image's first record and its subset (records repeat it subset.num_repeats times)
    usable: list[tuple[int, Subset]] = field(default_factory=list)

    def add(self, where, kind: str, message: str, fatal: bool = False, skipped: bool = False,
            strict: bool = False) -> None:
        if skipped and strict:  # fatal instead of skipped: counted once, under "fatal"
            fatal, skipped, message = True, False, message + " (--strict_data)"
        self.problems.append(Problem(str(where), kind, message, fatal, skipped))

    @property
    def skipped(self) -> list[Problem]:
        """Samples left out of the run (under --strict_data these problems are fatal instead)."""
        return [p for p in self.problems if p.skipped]

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def warnings(self) -> list[Problem]:
        """Samples kept with a note (converted, upscaled, empty caption)."""
        return [p for p in self.problems if not p.fatal and not p.skipped]

    def summary(self) -> str:
        """One line: usable samples, then skipped, fatal and warnings, each counted apart by kind."""

        def counted(problems: list[Problem], heading: str) -> str:
            kinds = Counter(p.kind for p in problems)
            details = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
            return f"{len(problems)} {heading}" + (f" ({details})" if details else "")

        parts = [counted(self.skipped, "skipped"), counted(self.fatal, "fatal")]
        if self.warnings:
            parts.append(counted(self.warnings, "warnings"))
        if self.kohya:
            found = (f"{self.usable_images} usable images of {self.lines} images "
                     f"({len(self.records)} samples an epoch with repeats)")
        else:
            found = f"{len(self.records)} usable samples of {self.lines} lines"
        return f"data check {self.root}: {found}, " + ", ".join(parts)

    def print(self, stream=None) -> None:
        """Every problem with its file and line (at most SHOWN_PER_KIND per kind), then the summary."""
        stream = stream or sys.stdout
        shown: Counter = Counter()
        for problem in self.problems:
            shown[problem.kind] += 1
            if shown[problem.kind] <= SHOWN_PER_KIND:
                label = "error" if problem.fatal else "skipped" if problem.skipped else "warning"
                print(f"  {label}: {problem}", file=stream)
        for kind, n in shown.items():
            if n > SHOWN_PER_KIND:
                print(f"  ... and {n - SHOWN_PER_KIND} more {kind}", file=stream)
        print(self.summary(), file=stream)


def _resolve_inside(root: Path, name: str) -> Path | str:
    """The image path for a ``file_name``, or why it is rejected (absolute / leaves the folder)."""
    if not name.strip():
        return "file_name is empty"
    if Path(name).is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return f"file_name {name!r} is absolute; give it relative to the data folder"
    path = root / name
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        return f"file_name {name!r} leaves the data folder ({real}); images must lie inside {root}"
    return path


def _print_and_raise_fatal(report: DataReport, quiet: bool, stream) -> None:
    if not quiet:
        report.print(stream)
    fatal = report.fatal
    if fatal:
        more = f" (and {len(fatal) - 1} more problems listed above)" if len(fatal) > 1 else ""
        raise UsageError(f"{fatal[0]}{more}")


def _leaves(real_root: Path, path: Path) -> bool | None:
    """Whether ``path`` (a symlink, or under one) resolves outside the data folder; None for a symlink loop."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python < 3.13's "Symlink loop"
        return None
    return real != real_root and real_root not in real.parents


class SmallImageRule(NamedTuple):
    """Below which size an image is "small", and the flags named in the finding: ``size_flag`` sets the
    size (--resolution, or --min_bucket_reso with --enable_bucket), ``skip_flag`` makes small images skipped."""

    width: int
    height: int
    size_flag: str
    skip_flag: str = "--skip_small_images"

    @classmethod
    def of(cls, resolution: "int | tuple[int, int] | SmallImageRule") -> "SmallImageRule":
        if isinstance(resolution, SmallImageRule):
            return resolution
        width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
        return cls(width, height, f"--resolution {resolution if isinstance(resolution, int) else f'{width},{height}'}")


def _check_image(path: Path, resolution, skip_small: bool
                 ) -> tuple[list[tuple[str, str, bool]], tuple[int, int] | None]:
    """((kind, message, skip) findings for one image, its (width, height) or None when it cannot be read);
    decodes it fully (catches truncation). ``resolution``: an int, (width, height) or a SmallImageRule;
    smaller in either side is small."""
    if not path.exists():
        return [("missing", f"image {path} does not exist; fix file_name or add the file", True)], None
    if path.is_dir():
        return [("unreadable", f"{path} is a folder, not an image", True)], None
    if path.stat().st_size == 0:
        return [("zero-byte", f"image {path} is empty (0 bytes)", True)], None
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: truncated or corrupt data fails here
            mode, (width, height) = image.mode, image.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return [("unreadable", f"cannot read image {path} ({err}); fix or remove it", True)], None
    except Image.DecompressionBombError as err:
        return [("unreadable", f"cannot read image {path} ({err})", True)], None
    findings = []
    if mode != "RGB":
        findings.append(("converted", f"image {path} is {mode}, converted to RGB", False))
    small = SmallImageRule.of(resolution)
    if width < small.width or height < small.height:
        if skip_small:
            findings.append(("too-small", f"image {path} is {width}x{height}, smaller than {small.size_flag}: "
                                          f"skipped ({small.skip_flag})", True))
        else:
            findings.append(("upscaled", f"image {path} is {width}x{height}, smaller than {small.size_flag}: "
                                         f"upscaled (pass {small.skip_flag} to skip it)", False))
    return findings, (width, height)


def _checking_bar(items, unit: str, progress: bool | None, quiet: bool):
    """tqdm over ``items``: on a terminal when ``progress`` is None, never when ``quiet``."""
    from tqdm.auto import tqdm

    show = False if quiet else progress
    return tqdm(items, desc="checking data", unit=unit, disable=(None if show is None else not show), leave=False)


def scan_image_folder(root: Path, image_column: str = "image", caption_column: str = "text", resolution: int = 512,
                      skip_small_images: bool = False, strict: bool = False, progress: bool | None = None,
                      stream=None, quiet: bool = False, caption_suffix: str = ".caption") -> DataReport:
    """Checks ``root/metadata.jsonl`` and every image it names in one pass (or, without it, a
    kohya-style folder: scan_kohya_folder); prints the problems and a summary; raises UsageError (one
    line) when the data cannot be trained on (see the module doc). ``progress=None``: a progress bar
    only on a terminal. ``quiet``: neither bar nor printout (under several processes only the main one
    checks: records.read_run_records)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--train_data_dir {root} is not a folder")
    meta = root / METADATA
    if meta.is_file():
        return _scan_metadata_folder(root, meta, image_column, caption_column, resolution, skip_small_images, strict,
                                     progress, stream, quiet)
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return scan_kohya_folder(root, caption_suffix, resolution=resolution, skip_small_images=skip_small_images,
                                 strict=strict, progress=progress, stream=stream, quiet=quiet)
    images = [p.name for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES][:3]
    hint = f" (found images such as {', '.join(images)})" if images else " (and no images)"
    raise UsageError(f"{root} has no {METADATA}{hint}: write one line per image, "
                     f'e.g. {{"file_name": "photo.jpg", "{caption_column}": "a photo of a face"}}, '
                     f"or put the images in kohya-style N_name/ subfolders with same-stem {caption_suffix} "
                     "caption files")


def _scan_metadata_folder(root: Path, meta: Path, image_column: str, caption_column: str, resolution: int,
                          skip_small_images: bool, strict: bool, progress: bool | None, stream,
                          quiet: bool) -> DataReport:
    image_key = image_column if image_column != "image" else "file_name"
    report = DataReport(root)
    try:
        text = meta.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {meta} ({err}); it must be UTF-8 text, one JSON object per line") from None
    with_caption_column = 0
    bar = _checking_bar(text.splitlines(), "line", progress, quiet)
    for number, line in enumerate(bar, start=1):
        if not line.strip():
            continue
        report.lines += 1
        where = f"{meta}:{number}"

        def problem(kind, message, fatal=False, skipped=False, where=where):
            report.add(where, kind, message, fatal, skipped, strict)

        record, size, has_caption_column = _metadata_record(line, root, image_key, caption_column, resolution,
                                                            skip_small_images, problem)
        with_caption_column += has_caption_column
        if record is not None:
            report.records.append(record)
            report.names.append(f"{record[0]} ({where})")
            report.sizes.append(size)
    bar.close()

    _print_and_raise_fatal(report, quiet, stream)
    if report.lines and not with_caption_column:
        raise UsageError(f'{meta}: no line has the caption column "{caption_column}"; add it or pass '
                         f"--caption_column (first line: {next(str(p) for p in report.problems)})")
    if not report.records:
        if not report.lines:
            raise UsageError(f"{meta} lists no images: add one line per image")
        raise UsageError(f"no usable samples in {root}: all {report.lines} skipped, first: {report.problems[0]}")
    return report


def _metadata_record(line: str, root: Path, image_key: str, caption_column: str, resolution: int,
                     skip_small_images: bool, problem
                     ) -> tuple[tuple[Path, str] | None, tuple[int, int] | None, bool]:
    """(the (image, caption) record of one metadata.jsonl line, or None; its image's (width, height);
    whether the line names its image and has the caption column). Every problem found goes to ``problem``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        problem("not-json", f"not valid JSON ({err.msg}); each line must be one JSON object", fatal=True)
        return None, None, False
    if not isinstance(row, dict):
        problem("not-json", f"a JSON {type(row).__name__}, not an object; each line must be one JSON object",
                fatal=True)
        return None, None, False
    if image_key not in row or not isinstance(row[image_key], str):
        problem("no-file-name", f'no "{image_key}" string naming the image file', fatal=True)
        return None, None, False
    path = _resolve_inside(root, row[image_key])
    if isinstance(path, str):
        problem("escapes-folder", path, fatal=True)
        return None, None, False
    caption = row.get(caption_column)
    if caption is None:
        problem("no-caption", f'{row[image_key]}: no caption column "{caption_column}" (columns: '
                              f'{", ".join(sorted(row))}); add it or pass --caption_column', skipped=True)
    elif not isinstance(caption, str):
        problem("bad-caption", f'{row[image_key]}: caption "{caption_column}" must be a string, got '
                               f"{caption!r}", skipped=True)
    elif not caption.strip():
        problem("empty-caption", f"{row[image_key]}: empty caption, trained unconditionally")
    findings, size = _check_image(path, resolution, skip_small_images)
    for kind, message, skip in findings:
        problem(kind, message, skipped=skip)
    if not isinstance(caption, str) or any(skip for _, _, skip in findings):
        return None, None, caption_column in row
    return (path, caption), size, True


# ----------------------------------------------------------------------------- kohya-style folders

OTHER_CAPTION_SUFFIXES = (".txt", ".caption", ".tags")  # named in the hint when --caption_extension misses


def read_caption_file(path: Path) -> tuple[str | None, str | None, int]:
    """(caption, None, lines) or (None, why it cannot be read, 0). The caption is the file's first line,
    stripped, as kohya reads it; a UTF-8 byte-order mark is dropped; ``lines`` counts non-blank lines."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return None, (f"caption file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                      f"{err.start}); save it as UTF-8"), 0
    except OSError as err:
        return None, f"cannot read caption file {path} ({err.strerror or err})", 0
    lines = text.splitlines()
    return (lines[0].strip() if lines else ""), None, sum(bool(line.strip()) for line in lines)


def scan_kohya_folder(root: Path, caption_suffix: str = ".caption", resolution: int = 512,
                      skip_small_images: bool = False, strict: bool = False, progress: bool | None = None,
                      stream=None, quiet: bool = False, is_reg: bool = False) -> DataReport:
    """Checks a kohya-style folder: ``root/N_name/img.jpg`` + ``img{caption_suffix}``, each image a
    record N times. Problems are kept, printed and raised as scan_image_folder does; ``where`` is the
    path of the file or folder concerned.

    fatal: a subfolder, image or caption file that resolves outside ``root`` (symlink); a ``0_name``
    folder; no usable image.
    skipped: an image without its caption file, an unreadable or non-UTF-8 caption file, an
    unreadable image (as in metadata.jsonl folders), a symlink loop, a subfolder that cannot be listed.
    warnings: a subfolder without an ``N_`` prefix (counted once), an empty subfolder, a nested folder
    or a file that is neither image nor caption (ignored), a caption file without its image, images in
    ``root`` itself (ignored), an empty or multi-line caption, converted or upscaled images.

    ``is_reg``: a --reg_data_dir; its subsets (subsets.folder_subset) are regularization images, and an image
    without its caption file is captioned by its folder's class tokens, as kohya does."""
    report = DataReport(root, kohya=True)
    real_root = root.resolve()

    def problem(where, kind, message, fatal=False, skipped=False):
        report.add(where, kind, message, fatal, skipped, strict)

    images: list[tuple[Path, Subset]] = []  # (image, its subset) in folder, then name order
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):  # .DS_Store, .ipynb_checkpoints, ...
            continue
        if entry.is_dir():
            if _leaves(real_root, entry):
                problem(entry, "escapes-folder", f"folder {entry} leaves the data folder ({entry.resolve()}); "
                                                 f"images must lie inside {root}", fatal=True)
                continue
            images += _kohya_subfolder_images(entry, caption_suffix, problem, is_reg)
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            problem(entry, "outside-subfolder", f"image {entry} is not in an N_name subfolder: ignored (move it "
                                                f"into e.g. {root / ('1_' + entry.stem)})")

    _check_subset_images(report, images, real_root, resolution, skip_small_images, strict, progress, quiet)
    _print_and_raise_fatal(report, quiet, stream)
    if not report.records:
        if not report.lines and is_reg:
            raise UsageError(f"--reg_data_dir {root} holds no images: put the regularization images in kohya-style "
                             f"N_class/ subfolders (e.g. {root / '1_woman' / 'img001.png'}), or drop --reg_data_dir")
        if not report.lines:
            raise UsageError(f"{root} has no {METADATA} and its subfolders hold no images: put them in kohya-style "
                             f"N_name/ subfolders (e.g. {root / '10_name' / 'img001.jpg'} + img001{caption_suffix})"
                             f", or write a {METADATA}")
        raise UsageError(f"no usable samples in {root}: all {report.lines} images skipped, first: "
                         f"{report.skipped[0]}")
    return report


def scan_subsets(root: Path, subsets: list[Subset], resolution: int = 512, skip_small_images: bool = False,
                 strict: bool = False, progress: bool | None = None, stream=None, quiet: bool = False) -> DataReport:
    """Checks the images of each subset's folder (not its subfolders) as scan_kohya_folder checks those of
    its N_name folders; ``root`` names the data in messages. No usable image raises UsageError."""
    report = DataReport(root, kohya=True)

    def problem(where, kind, message, fatal=False, skipped=False):
        report.add(where, kind, message, fatal, skipped, strict)

    for subset in subsets:
        images = _folder_images(subset, problem)
        _check_subset_images(report, images, subset.image_dir.resolve(), resolution, skip_small_images, strict,
                             progress, quiet)
    _print_and_raise_fatal(report, quiet, stream)
    if not report.records:
        raise UsageError(f"no usable images in {root}" + (f": all {report.lines} skipped, first: {report.skipped[0]}"
                                                          if report.lines else ""))
    return report


def _check_subset_images(report: DataReport, images: list[tuple[Path, Subset]], real_root: Path, resolution,
                         skip_small_images: bool, strict: bool, progress: bool | None, quiet: bool) -> None:
    """Checks each (image, subset) and adds the usable ones to ``report``, each subset.num_repeats times."""

    def problem(where, kind, message, fatal=False, skipped=False):
        report.add(where, kind, message, fatal, skipped, strict)

    root = report.root
    bar = _checking_bar(images, "image", progress, quiet)
    for path, subset in bar:
        repeats = subset.num_repeats
        report.lines += 1
        leaves = _leaves(real_root, path)
        if leaves is None:
            problem(path, "unreadable", f"image {path} is a symlink loop; fix or remove it", skipped=True)
            continue
        if leaves:
            problem(path, "escapes-folder", f"image {path} leaves the data folder ({path.resolve()}); images "
                                            f"must lie inside {root}", fatal=True)
            continue
        caption, escapes = _kohya_caption(path, subset, real_root, problem)
        if escapes:
            continue
        findings, size = _check_image(path, resolution, skip_small_images)
        for kind, message, skip in findings:
            problem(path, kind, message, skipped=skip)
        if caption is None or any(skip for _, _, skip in findings):
            continue
        report.usable_images += 1
        report.usable.append((len(report.records), subset))
        report.records += [(path, caption)] * repeats
        report.names += [f"{path} (x{repeats} an epoch)"] * repeats
        report.sizes += [size] * repeats
    bar.close()


def _kohya_caption(path: Path, subset: Subset, real_root: Path, problem) -> tuple[str | None, bool]:
    """(the caption of image ``path`` from its same-stem caption file, else its subset's class tokens, or None
    when there is none to train on; whether that file leaves the data folder, a fatal problem). Problems go to
    ``problem``."""
    caption_suffix = subset.caption_extension
    caption_path = path.with_suffix(caption_suffix)
    if _leaves(real_root, caption_path) is None:
        problem(caption_path, "bad-caption", f"caption file {caption_path} is a symlink loop; fix or remove it",
                skipped=True)
        return None, False
    if not caption_path.is_file() and subset.class_tokens is not None:  # kohya: the folder's class tokens
        return subset.class_tokens, False
    if not caption_path.is_file():
        others = [path.with_suffix(s).name for s in OTHER_CAPTION_SUFFIXES
                  if s != caption_suffix and path.with_suffix(s).is_file()]
        hint = (f" (found {others[0]}: pass --caption_extension {Path(others[0]).suffix})" if others
                else " (or pass --caption_extension naming your captions' suffix)")
        problem(path, "no-caption", f"image {path} has no caption file {caption_path.name}; add it{hint}",
                skipped=True)
        return None, False
    if _leaves(real_root, caption_path):
        problem(caption_path, "escapes-folder", f"caption file {caption_path} leaves the data folder "
                                                f"({caption_path.resolve()})", fatal=True)
        return None, True
    caption, why, lines = read_caption_file(caption_path)
    if why is not None:
        problem(caption_path, "bad-caption", why, skipped=True)
    elif not caption:
        problem(caption_path, "empty-caption", f"caption file {caption_path} is empty: {path.name} "
                                               "trains unconditionally")
    if caption and lines > 1:
        problem(caption_path, "multi-line-caption", f"caption file {caption_path} has {lines} lines: "
                                                    "only the first is the caption")
    return caption, False


def _kohya_subfolder_images(folder: Path, caption_suffix: str, problem, is_reg: bool = False
                            ) -> list[tuple[Path, Subset]]:
    """The images of one ``N_name`` folder with its subset; notes on everything else in it."""
    subset = folder_subset(folder, is_reg, caption_suffix)
    if subset is None:
        subset = Subset(folder, 1, is_reg, folder.name if is_reg else None, caption_suffix)
        problem(folder, "no-repeats", f"folder {folder} has no repeat-count prefix (kohya-style N_name, e.g. "
                                      f"10_{folder.name}): its images count once an epoch")
    elif subset.num_repeats < 1:
        problem(folder, "bad-repeats", f"folder {folder} repeats its images {subset.num_repeats} times an epoch; "
                                       "rename it with N >= 1 (or move it out of the data folder)", fatal=True)
        return []
    return _folder_images(subset, problem)


def _folder_images(subset: Subset, problem) -> list[tuple[Path, Subset]]:
    """The images of ``subset``'s folder, in name order; notes on everything else in it."""
    folder, caption_suffix = subset.image_dir, subset.caption_extension
    try:
        entries = [e for e in sorted(folder.iterdir()) if not e.name.startswith(".")]
    except OSError as err:  # no permission to list it: its images cannot be trained
        problem(folder, "unreadable", f"cannot list folder {folder} ({err.strerror or err}); fix its permissions",
                skipped=True)
        return []
    images = [e for e in entries if e.suffix.lower() in IMAGE_SUFFIXES and not e.is_dir()]
    stems = {e.stem for e in images}
    for entry in entries:
        if entry.is_dir():
            problem(entry, "nested-folder", f"{entry} is a folder inside {folder.name}/: ignored (subfolders are "
                                            "not read; move its images up or into their own N_name folder)")
        elif entry.name.endswith(caption_suffix):  # endswith, not .suffix: --caption_extension .wd14.txt works
            if entry.name[: -len(caption_suffix)] not in stems:
                problem(entry, "orphan-caption", f"caption file {entry} has no image of the same stem: ignored")
        elif entry.suffix.lower() not in IMAGE_SUFFIXES:
            problem(entry, "not-image", f"{entry} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor "
                                        f"a {caption_suffix} caption: ignored")
    if not images:
        problem(folder, "empty-folder", f"folder {folder} holds no images: nothing of it is trained")
    return [(image, subset) for image in images]
