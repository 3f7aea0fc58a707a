"""YAML run configs with command-line overrides.

Every verb takes ``--config FILE.yaml``. A verb's options default to ``None`` on the command line, so
that an option the user typed can be told apart from one they did not: typed flags win over the
YAML file, which wins over the verb's own defaults.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import yaml


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(defaults: dict[str, Any], config_path: str | Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    """Merge verb defaults < YAML file < flags given on the command line (``None`` = not given).

    Unknown keys in the YAML file are an error naming the file and the key (a typo must not be
    ignored silently).
    """
    file_cfg = load_yaml(config_path)
    unknown = sorted(set(file_cfg) - set(defaults))
    if unknown:
        raise ConfigError(f"{config_path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
    out = dict(defaults)
    out.update(file_cfg)
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def save_yaml(cfg: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(cfg), sort_keys=True), encoding="utf-8")


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def signature_defaults(fn: Callable, exclude: tuple[str, ...] = (), rename: dict[str, str] | None = None) -> dict[str, Any]:
    """The keyword defaults of a verb's function (the one place they are stated), keyed as the CLI names
    them (``rename``: function parameter -> CLI option), for ``resolve`` and ``with_default``."""
    rename = rename or {}
    return {
        rename.get(n, n): p.default
        for n, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and n not in exclude
    }


def with_default(help_text: str, defaults: dict[str, Any], key: str) -> str:
    """``help_text`` + " Default X." with X read from the verb's ``defaults`` (the one place it is stated)."""
    v = defaults[key]
    if isinstance(v, bool):
        shown = "on" if v else "off"
    elif isinstance(v, (list, tuple)):
        shown = ",".join(map(str, v))
    else:
        shown = str(v)
    return f"{help_text.rstrip()} Default {shown}."
