"""What ``python -m sat_train.compare`` compares: its sources (``--lora`` and ``--images``), their names
and training steps, the seeds, and the images of an ``--images`` folder.

A source's name comes from its path, so that the tables and grids read as the runs do: ``none`` (the base
alone), a run folder's name (``sat-sac``), ``RUN/checkpoint-N`` for a checkpoint folder (step N), a LoRA
file's stem (the folder's name for the files a run writes), an ``--images`` folder's name. ``NAME=PATH``
names a source explicitly (two runs both called ``sat`` in different folders, say). Generated images are
written under ``images/<name>/``, so a name is one or more plain path parts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..data.datacheck import IMAGE_SUFFIXES, to_rgb
from ..errors import UsageError
from ..outputs.checkpoints import checkpoint_step
from ..outputs.lora_files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, find_lora_file

NONE = "none"  # --lora none: the base model without a LoRA
RUN_FILES = (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME)  # named after their folder: their own names say nothing
SEEDS = re.compile(r"(\d+)(?:-(\d+))?")
MAX_SEEDS = 10_000  # a typo such as 0-1000000 would render for days: refused instead


@dataclass(frozen=True)
class Source:
    """One compared source. ``kind``: "none" (the base model), "lora" or "images"; ``path``: the --lora
    or --images argument (None for none); ``step``: N of a checkpoint-N folder, else None; ``run``: the
    run folder a checkpoint belongs to (absolute), else the name (the report plots one run's steps)."""

    name: str
    kind: str
    path: Path | None
    step: int | None
    run: str

    @property
    def generated(self) -> bool:
        return self.kind != "images"


def parse_seeds(text: str) -> list[int]:
    """``"0-7"``, ``"0,3,5"`` or both (``"0-3,10"``) -> the seeds in that order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        match = SEEDS.fullmatch(part.strip())
        if match is None:
            raise UsageError(f"--seeds {text}: {part.strip()!r} is not a seed or a range; write e.g. 0-7, 0,3,5 or "
                             "0-3,10 (seeds are integers >= 0)")
        low, high = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if high < low:
            raise UsageError(f"--seeds {text}: the range {part.strip()} runs backwards; write {high}-{low}")
        if high - low + len(seeds) >= MAX_SEEDS:
            raise UsageError(f"--seeds {text}: more than {MAX_SEEDS} seeds; give fewer")
        seeds += [s for s in range(low, high + 1) if s not in seeds]
    return seeds


def source_step(path: Path) -> int | None:
    """N when ``path`` is a ``checkpoint-N`` folder or a file in one, else None."""
    path = Path(os.path.abspath(path))
    return checkpoint_step(path.parent if path.is_file() else path)


def name_of(path: Path) -> str:
    """A source's name from its path (the module docstring's rules)."""
    path = Path(os.path.abspath(path))  # "." and "runs/sat/.." get their folders' names
    if path.is_file():
        if path.name not in RUN_FILES:
            return path.stem
        path = path.parent
    if checkpoint_step(path) is not None:
        return f"{path.parent.name}/{path.name}"
    return path.name


def check_name(name: str, given: str, flag: str) -> str:
    """A name given as NAME=PATH: plain path parts (it becomes images/<name>/)."""
    parts = name.split("/")
    if any(part in ("", ".", "..") or "\\" in part for part in parts):
        raise UsageError(f"{flag} {given}: the name {name!r} must be one or more plain folder names (no empty "
                         "parts, '.', '..' or backslashes), e.g. sat-sac or sat-sac/step500")
    return name


def split_named(given: str, flag: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain path (or one that exists with "=" in it) -> (None, PATH)."""
    name, sep, path = given.partition("=")
    if not sep or Path(given).exists():
        return None, given
    return check_name(name, given, flag), path


def lora_source(given: str) -> Source:
    """A --lora argument: ``none``, a run folder, a checkpoint-N folder or a LoRA file, checked to exist
    and to hold a LoRA (outputs.lora_files.find_lora_file); ``NAME=PATH`` names it."""
    name, path = split_named(given, "--lora")
    if path == NONE and name is None:
        return Source(NONE, "none", None, None, NONE)
    path = Path(path)
    find_lora_file(path)
    return described("lora", path, name)


def images_source(given: str) -> Source:
    """An --images argument: a folder holding at least one image; ``NAME=DIR`` names it."""
    name, path = split_named(given, "--images")
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise UsageError(f"--images {path} {what}; pass a folder of images (paired across sources by file name)")
    image_files(path)  # refuses a folder without images now, before anything loads
    return described("images", path, name)


def described(kind: str, path: Path, name: str | None) -> Source:
    step = source_step(path)
    name = name or name_of(path)
    folder = Path(os.path.abspath(path))
    run = str((folder.parent if folder.is_file() else folder).parent) if step is not None else name
    return Source(name, kind, path, step, run)


def image_files(folder: Path) -> list[Path]:
    """The images directly in ``folder`` (by suffix, sorted by name; subfolders are not read)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"--images {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); pass the folder "
                         "the images are in (subfolders are not read)")
    return files


def read_image(path: Path) -> Image.Image | str:
    """``path`` as an RGB image, or one line saying why it cannot be read (the caller skips it)."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated file fails here, not inside the scorer
            return to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"cannot read image {path} ({err}); skipped"


def check_unique(sources: list[Source]) -> None:
    """Two sources with one name would write into one images/ folder and pair with themselves."""
    seen: dict[str, Source] = {}
    for source in sources:
        first = seen.setdefault(source.name, source)
        if first is not source:
            flag, path = ("--images" if source.kind == "images" else "--lora"), source.path or NONE
            raise UsageError(f"two sources are named {source.name!r} ({first.path or NONE} and {path}); name one "
                             f"yourself (NAME=PATH, e.g. {flag} {source.name}-2={path}) or drop the repeat")
