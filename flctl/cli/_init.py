"""``flctl init``: a new project folder from a template."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from flctl.core.errors import ConfigError, ProjectExistsError

__all__ = ["DEFAULT_PARAMS", "InitResult", "available_templates", "init_project"]

# Template files that are written under another name.
_RENAMES = {"gitignore": ".gitignore"}
_RENDERED = {"flctl.toml"}

#: Parameters of the ``large`` template's model when ``--params`` is not given (500 MB).
DEFAULT_PARAMS = 125_000_000


@dataclass(frozen=True)
class InitResult:
    """What ``init`` wrote."""

    path: Path
    template: str
    files: list[str]


def available_templates() -> list[str]:
    """Names of the templates ``flctl init --template`` accepts."""
    root = resources.files("flctl.templates")
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir() and entry.joinpath("flctl.toml").is_file()
    )


def init_project(
    path: Path,
    *,
    template: str = "digits",
    force: bool = False,
    seed: int = 0,
    variables: dict[str, str] | None = None,
) -> InitResult:
    """Write a project from ``template`` into ``path``.

    Raises:
        ConfigError: Unknown template.
        ProjectExistsError: ``path`` holds a project (or other files) and ``force`` is off.
    """
    templates = available_templates()
    if template not in templates:
        raise ConfigError(
            f"unknown template {template!r}", hint=f"available: {', '.join(templates)}"
        )
    if path.exists() and not path.is_dir():
        raise ProjectExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ProjectExistsError(
            f"{path} is not empty", hint="pass --force to overwrite the template's files"
        )
    values = {
        "project_name": path.resolve().name,
        "seed": str(seed),
        "params": str(DEFAULT_PARAMS),
        **(variables or {}),
    }
    source = resources.files("flctl.templates").joinpath(template)
    path.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for entry in sorted(source.iterdir(), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith("__") or entry.name.endswith(".pyc"):
            continue
        name = _RENAMES.get(entry.name, entry.name)
        text = entry.read_text(encoding="utf-8")
        if entry.name in _RENDERED:
            for key, value in values.items():
                text = text.replace("{{ " + key + " }}", value)
        target = path / name
        temp = target.with_name(f".{name}.tmp")
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, target)
        written.append(name)
    return InitResult(path.resolve(), template, written)
