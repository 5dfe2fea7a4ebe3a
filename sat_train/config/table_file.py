"""A settings file's top-level table, JSON or TOML, with one-line errors: --config_file's and --dataset_config's
reader (apart from both, which import what reads them back: the flags, TrainConfig)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from ..errors import UsageError


def read_settings_file(path: str, flag: str = "--config_file",
                       holds: str = "a table of settings; write {\"key\": value, ...}") -> dict:
    """The file's top-level table; JSON for .json, else TOML (NAME means NAME.toml, as in sd-scripts).
    ``flag`` names the file in messages; ``holds`` says what it should hold."""
    file = Path(path)
    if file.suffix.lower() not in (".json", ".toml") and not file.is_file():
        file = file.with_name(file.name + ".toml")
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text) if file.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{flag} {path}: cannot read it ({err.strerror if isinstance(err, OSError) else err});"
                         " give an existing .json or .toml file") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        kind = "JSON" if file.suffix.lower() == ".json" else "TOML"
        raise UsageError(f"{flag} {path}: not valid {kind} ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(f"{flag} {path}: holds a {type(data).__name__}, not {holds}")
    return data
