"""--dataset_config dataset.toml: kohya-ss/sd-scripts' dataset file, read as sd-scripts reads it.

    [general]                    values for every dataset and subset
    [[datasets]]                 resolution, batch_size, bucket keys; subset values for its subsets
      [[datasets.subsets]]       image_dir (required), num_repeats, is_reg, class_tokens, caption keys, ...

A subset's value comes from the subset, else its dataset, else [general], else the command line, else
the flag's default (sd-scripts' fallback order); a dataset value found in the file wins over the flag
(``resolution`` over --resolution, ``batch_size`` over --train_batch_size), as in sd-scripts, and
--train_data_dir / --reg_data_dir are ignored (with a note); TrainConfig applies these when it is made.
JSON files (.json) are read the same way.

sat trains one resolution, batch size and crop/flip rule per run: where the file gives datasets or
subsets different values of those, it stops with one line instead of training something else. Keys
sd-scripts knows but sat does not implement, and unknown keys, are one line each, never ignored.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from ..data.subsets import Subset
from ..errors import UsageError
from .table_file import read_settings_file

# key -> (type check, what the message calls it); bool before int: True is an int in Python
_BOOL, _INT, _FLOAT, _STR = ((bool,), "true or false"), ((int,), "an integer"), ((int, float), "a number"), \
    ((str,), "a string")

# subset keys that may also sit in [[datasets]] or [general] (sd-scripts' "ascendable" keys)
SUBSET_KEYS = {"num_repeats": _INT, "shuffle_caption": _BOOL, "keep_tokens": _INT, "caption_extension": _STR,
               "caption_dropout_rate": _FLOAT, "caption_tag_dropout_rate": _FLOAT, "flip_aug": _BOOL,
               "random_crop": _BOOL}
# keys of one subset only
SUBSET_ONLY_KEYS = {"image_dir": _STR, "is_reg": _BOOL, "class_tokens": _STR, "alpha_mask": _BOOL,
                    "conditioning_data_dir": _STR}
# keys of a dataset (or [general]): one value for the whole run in sat
DATASET_KEYS = {"resolution": None, "batch_size": _INT, "enable_bucket": _BOOL, "min_bucket_reso": _INT,
                "max_bucket_reso": _INT, "bucket_reso_steps": _INT, "bucket_no_upscale": _BOOL,
                "resize_interpolation": _STR}
# the TrainConfig field each dataset key sets
DATASET_FIELDS = {"resolution": "resolution", "batch_size": "train_batch_size", "enable_bucket": "enable_bucket",
                  "min_bucket_reso": "min_bucket_reso", "max_bucket_reso": "max_bucket_reso",
                  "bucket_reso_steps": "bucket_reso_steps", "bucket_no_upscale": "bucket_no_upscale",
                  "resize_interpolation": "image_interpolation_mode"}
# subset keys sat applies to the whole run (crops and flips happen in one transform): they must agree
RUN_WIDE_SUBSET_KEYS = ("flip_aug", "random_crop")
# sd-scripts' resize_interpolation names -> --image_interpolation_mode; "area" (OpenCV's INTER_AREA, their
# default when shrinking) -> PIL's box filter, the same pixel-area average
INTERPOLATIONS = {"lanczos": "lanczos", "lanczos4": "lanczos", "nearest": "nearest", "bilinear": "bilinear",
                  "linear": "bilinear", "bicubic": "bicubic", "cubic": "bicubic", "area": "box", "box": "box"}
# keys sd-scripts reads that sat does not implement: named, never silently ignored
UNSUPPORTED_KEYS = ("color_aug", "face_crop_aug_range", "caption_separator", "keep_tokens_separator",
                    "secondary_separator", "enable_wildcard", "token_warmup_min", "token_warmup_step",
                    "caption_prefix", "caption_suffix", "custom_attributes", "caption_dropout_every_n_epochs",
                    "cache_info", "metadata_file", "validation_seed", "validation_split", "network_multiplier",
                    "debug_dataset")
KNOWN_KEYS = {*SUBSET_KEYS, *SUBSET_ONLY_KEYS, *DATASET_KEYS, *UNSUPPORTED_KEYS, "subsets"}
# flags the file replaces (sd-scripts ignores them when it is given)
REPLACED_FLAGS = ("train_data_dir", "reg_data_dir")


@dataclass(frozen=True)
class SubsetTable:
    """One [[datasets.subsets]] table with the values it inherits from its dataset and [general]; a key
    none of them sets is absent from ``values`` (the command line's flag applies)."""

    where: str  # "[[datasets]] 1, [[datasets.subsets]] 2" (1-based), for messages
    values: dict

    def subset(self, config) -> Subset:
        """The data room's Subset; a caption key no table sets stays None (the run's flag applies)."""
        v = self.values
        extension = v.get("caption_extension")
        conditioning = v.get("conditioning_data_dir")
        return Subset(Path(v["image_dir"]), v.get("num_repeats", 1), v.get("is_reg", False), v.get("class_tokens"),
                      config.caption_suffix if extension is None else "." + extension.strip().lstrip("."),
                      shuffle_caption=v.get("shuffle_caption"), keep_tokens=v.get("keep_tokens"),
                      caption_dropout_rate=v.get("caption_dropout_rate"),
                      caption_tag_dropout_rate=v.get("caption_tag_dropout_rate"),
                      alpha_mask=v.get("alpha_mask", False),
                      conditioning_data_dir=None if conditioning is None else Path(conditioning))


@dataclass(frozen=True)
class DatasetFile:
    """What a --dataset_config file says: TrainConfig values for the whole run, and its subsets in order."""

    path: str
    run_settings: dict  # TrainConfig field -> value (resolution, train_batch_size, buckets, crops, flips)
    subsets: list[SubsetTable]
    notes: list[str]  # what was ignored, said once when the flags are read (cli.parse_config)

    @property
    def gives_masks(self) -> bool:
        """Whether a subset names a loss-mask source (alpha_mask, conditioning_data_dir): the run masks its loss."""
        return any(t.values.get("alpha_mask") or "conditioning_data_dir" in t.values for t in self.subsets)


def dataset_config_settings(path: str) -> dict:
    """The TrainConfig values --dataset_config sets over the flags (TrainConfig.__post_init__ applies them):
    its run-wide values, --train_data_dir and --reg_data_dir unset (the file names the images), and
    --masked_loss on when a subset names masks (kohya's alpha_mask turns it on alike)."""
    found = read_dataset_config(path)
    return {**{flag: None for flag in REPLACED_FLAGS}, **found.run_settings,
            **({"masked_loss": True} if found.gives_masks else {})}


def say_dataset_config_notes(given: dict) -> None:
    """Say once what --dataset_config makes the run ignore: flags it replaces, repeated subsets."""
    found = read_dataset_config(given["dataset_config"])
    dropped = [flag for flag in REPLACED_FLAGS if given.get(flag) is not None]
    notes = found.notes + ([f"--dataset_config {found.path} names the images: ignoring "
                            f"{', '.join('--' + flag for flag in dropped)}, as sd-scripts does"] if dropped else [])
    for note in notes:
        print(f"sat-train: note: {note}")


def read_dataset_config(path: str) -> DatasetFile:
    data = read_settings_file(path, "--dataset_config", "[general] and [[datasets]]")
    where = f"--dataset_config {path}"
    unknown = set(data) - {"general", "datasets"}
    if unknown:
        raise UsageError(f"{where}: unknown table {sorted(unknown)[0]!r}; the file holds [general] and [[datasets]] "
                         "with [[datasets.subsets]] (sd-scripts' dataset config)")
    general = check_table(data.get("general", {}), "[general]", where, allowed={*SUBSET_KEYS, *DATASET_KEYS})
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise UsageError(f"{where}: no [[datasets]]; add at least one, with [[datasets.subsets]] naming an image_dir")
    run: dict[str, tuple] = {}  # key -> (value as its field takes it, as written, where it was set)
    subsets: list[SubsetTable] = []
    notes: list[str] = []
    for d, dataset in enumerate(datasets, 1):
        dataset_where = f"[[datasets]] {d}"
        dataset = check_table(dataset, dataset_where, where, allowed={*SUBSET_KEYS, *DATASET_KEYS, "subsets"})
        values = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        for key in DATASET_KEYS:
            if key in values:
                agree(run, key, values[key], dataset_value(key, values[key], dataset_where, where), dataset_where,
                      where)
        tables = dataset.get("subsets", [])
        if not isinstance(tables, list) or not tables:
            raise UsageError(f"{where}: {dataset_where} has no [[datasets.subsets]]; add one with an image_dir")
        seen: set[str] = set()
        for s, table in enumerate(tables, 1):
            subset_where = f"{dataset_where}, [[datasets.subsets]] {s}"
            table = check_table(table, subset_where, where, allowed={*SUBSET_KEYS, *SUBSET_ONLY_KEYS})
            if "image_dir" not in table:
                raise UsageError(f"{where}: {subset_where} has no image_dir; name the folder that holds its images")
            if table["image_dir"] in seen:  # sd-scripts drops a repeated subset of the same dataset
                notes.append(f"{where}: {subset_where} repeats image_dir {table['image_dir']!r} of an earlier "
                             "subset of its dataset: ignored, as sd-scripts does")
                continue
            seen.add(table["image_dir"])
            inherited = {k: v for k, v in values.items() if k in SUBSET_KEYS}
            subset = SubsetTable(subset_where, {**inherited, **table})
            check_subset_values(subset, where)
            for key in RUN_WIDE_SUBSET_KEYS:
                if key in subset.values:
                    agree(run, key, subset.values[key], subset.values[key], subset_where, where)
            subsets.append(subset)
    for key in RUN_WIDE_SUBSET_KEYS:  # one flip/crop rule for the run: a subset may not fall back to the flag
        unset = [t for t in subsets if key not in t.values]
        if key in run and unset:
            _, given, setter = run[key]
            raise UsageError(f"{where}: {key} is {given!r} in {setter} but not set in {unset[0].where}; sat "
                             f"applies one {key} to the whole run: set it in [general] (or in every subset)")
    return DatasetFile(path, dict(run_field(key, value) for key, (value, _, _) in run.items()), subsets, notes)


def check_subset_values(subset: SubsetTable, where: str) -> None:
    """Folders exist; counts and rates are in range (one line naming the table and the key)."""
    v, at = subset.values, f"{where}: {subset.where}"
    for key in ("image_dir", "conditioning_data_dir"):
        if key in v and not Path(v[key]).is_dir():
            raise UsageError(f"{at}: {key} {v[key]!r} is not a folder; give the folder that holds its "
                             f"{'images' if key == 'image_dir' else 'mask images'}")
    if v.get("num_repeats", 1) < 1:
        raise UsageError(f"{at}: num_repeats must be >= 1 (times each image is seen an epoch), got {v['num_repeats']}")
    if v.get("keep_tokens", 0) < 0:
        raise UsageError(f"{at}: keep_tokens must be >= 0, got {v['keep_tokens']}")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= v.get(key, 0.0) <= 1.0:
            raise UsageError(f"{at}: {key} is a probability: give a value in [0, 1], got {v[key]}")
    if v.get("alpha_mask") and "conditioning_data_dir" in v:
        raise UsageError(f"{at}: alpha_mask and conditioning_data_dir are two mask sources: keep one")


def check_table(table, table_where: str, where: str, allowed: set[str]) -> dict:
    """``table`` when every key is one ``allowed`` here and each value has its key's type; else one line."""
    if not isinstance(table, dict):
        raise UsageError(f"{where}: {table_where} is not a table; write it as [{table_where.split(' ')[0]}]-style "
                         "keys")
    for key, value in table.items():
        if key in UNSUPPORTED_KEYS:
            raise UsageError(f"{where}: {table_where} sets {key}, an sd-scripts key sat does not support; remove it "
                             "(sat's own flags: python -m sat_train --help)")
        if key not in allowed:
            if key in KNOWN_KEYS:
                places = "[[datasets.subsets]]" if key in SUBSET_ONLY_KEYS else "[general] or [[datasets]]"
                raise UsageError(f"{where}: {table_where} sets {key}, which belongs in {places}; move it")
            hint = difflib.get_close_matches(key, sorted(KNOWN_KEYS - set(UNSUPPORTED_KEYS)), n=1)
            raise UsageError(f"{where}: {table_where} has unknown key {key!r}"
                             f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; see sd-scripts' config_README")
        kind = {**SUBSET_KEYS, **SUBSET_ONLY_KEYS, **DATASET_KEYS}.get(key)
        if kind is not None and not (isinstance(value, kind[0]) and (bool in kind[0] or not isinstance(value, bool))):
            raise UsageError(f"{where}: {table_where}: {key} must be {kind[1]}, got {value!r}")
    return table


def dataset_value(key: str, value, dataset_where: str, where: str):
    """A dataset key's value as its TrainConfig field takes it."""
    if key == "resolution":  # an int (square) or [width, height], as sd-scripts takes it
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            return f"{value[0]},{value[1]}" if value[0] != value[1] else value[0]
        raise UsageError(f"{where}: {dataset_where}: resolution must be an integer or [width, height], got {value!r}")
    if key == "resize_interpolation":
        if value not in INTERPOLATIONS:
            raise UsageError(f"{where}: {dataset_where}: resize_interpolation {value!r} is not one of "
                             f"{', '.join(INTERPOLATIONS)}")
        return INTERPOLATIONS[value]
    return value


def run_field(key: str, value) -> tuple[str, object]:
    """(TrainConfig field, value) of a run-wide key: flip_aug -> random_flip; random_crop -> center_crop's
    opposite (sd-scripts center-crops unless random_crop is set); dataset keys -> DATASET_FIELDS."""
    if key == "flip_aug":
        return "random_flip", value
    if key == "random_crop":
        return "center_crop", not value
    return DATASET_FIELDS[key], value


def agree(run: dict, key: str, given, value, table_where: str, where: str) -> None:
    """Record ``key``'s ``value`` (as its field takes it; ``given``: as the file wrote it); a different value
    in an earlier dataset or subset is one line."""
    if key in run and run[key][0] != value:
        _, earlier, earlier_where = run[key]
        raise UsageError(f"{where}: {key} is {given!r} in {table_where} but {earlier!r} in {earlier_where}; sat "
                         f"trains one {key} per run: give every dataset and subset the same (or run them apart)")
    run.setdefault(key, (value, given, table_where))
