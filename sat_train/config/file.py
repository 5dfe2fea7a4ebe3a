"""--config_file: settings from a JSON or TOML file (kohya-ss/sd-scripts' flag), under the flags
typed on the command line.

Keys are TrainConfig's field names (the flags without ``--``). As in sd-scripts, TOML tables are
merged into one level (``[model]`` / ``[training]`` sections are only for reading), and a name
without a suffix is read as NAME.toml. A run's own ``train_config.json`` is a valid config file:
its ``resolved`` block (what the run derived) and ``config_file`` key (the file it was read from)
are ignored. Values go through the same argparse types and choices as the flags, so a file says
nothing the command line could not.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing

from ..errors import UsageError
from .flags import build_parser
from .table_file import read_settings_file
from .settings import TrainConfig

IGNORED_KEYS = ("resolved", "config_file")  # train_config.json's derived block; the file's own origin


def config_file_settings(path: str) -> dict:
    """The file's settings as TrainConfig keyword arguments, each value converted and checked by its
    flag's own argparse type and choices (flags.build_parser)."""
    raw = flatten_tables(read_settings_file(path), path)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in raw:
        if key not in fields:
            raise UsageError(f"--config_file {path}: unknown key {key!r}{close_match_hint(key, fields)}; keys are "
                             "the flag names without -- (see --help)")
    bool_fields = {name for name, hint in typing.get_type_hints(TrainConfig).items() if hint is bool}
    settings, words = {}, []
    for key, value in raw.items():
        if key in bool_fields:  # store_true flags cannot say false; a file can
            settings[key] = check_bool(key, value, path)
        elif value is None:  # JSON null (TOML has none): the setting unset
            settings[key] = None
        else:
            words += flag_words(key, value, path)
    try:
        settings.update(vars(build_parser(_RaisingParser).parse_args(words)))
    except UsageError as err:
        raise UsageError(f"--config_file {path}: {err}") from None
    return settings


def flatten_tables(data: dict, path: str) -> dict:
    """One level of tables merged into the top (sd-scripts' TOML sections); IGNORED_KEYS dropped."""
    flat = {}
    for key, value in data.items():
        if key in IGNORED_KEYS:
            continue
        for name, item in (value.items() if isinstance(value, dict) else [(key, value)]):
            if name in flat:
                raise UsageError(f"--config_file {path}: {name!r} is set twice (in two sections); keep one")
            flat[name] = item
    return flat


def flag_words(key: str, value, path: str) -> list[str]:
    """``key = value`` as the command-line words argparse reads (floats as repr: exact round trip)."""
    if isinstance(value, list):
        if any(isinstance(item, (list, dict)) for item in value):
            raise UsageError(f"--config_file {path}: {key} holds nested lists or tables; give flat values")
        return [f"--{key}", *(as_word(item) for item in value)]
    if isinstance(value, (dict, bool)):
        raise UsageError(f"--config_file {path}: {key} = {value!r} is not a value of --{key}; see --help")
    return [f"--{key}={as_word(value)}"]


def as_word(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def check_bool(key: str, value, path: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"--config_file {path}: {key} is on/off: give true or false, not {value!r}")
    return value


def close_match_hint(key: str, names) -> str:
    match = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


class _RaisingParser(argparse.ArgumentParser):
    """argparse whose errors (bad type, bad choice, list for a one-value flag) raise UsageError."""

    def error(self, message: str):
        raise UsageError(message)
