"""Typed, validated settings. Each concern is a frozen dataclass whose ``validate()`` collects
every violation and raises one :class:`ConfigError` with a line per field."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import BadInput


class ConfigError(BadInput, ValueError):
    """Invalid settings: ``violations`` lists one message per bad field (exit 2)."""

    def __init__(self, violations: list[str]):
        self.violations = list(violations)
        super().__init__("invalid settings:\n" + "\n".join(f"  - {v}" for v in self.violations))


def from_dict(cls, values: dict[str, Any]):
    """Build the dataclass ``cls`` from a dict, rejecting unknown keys (one error listing them all)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError([f"unknown setting {k!r} for {cls.__name__}; known: {', '.join(sorted(names))}"
                           for k in unknown])
    return cls(**values)


def defaults_of(cls) -> dict[str, Any]:
    """The defaults of the dataclass ``cls``'s fields (fields without one are left out): what the
    settings table of a command compares its settings with (:func:`lib.common.cli.settings_table`)."""
    out = {}
    for field in dataclasses.fields(cls):
        if field.default_factory is not dataclasses.MISSING:
            out[field.name] = field.default_factory()
        elif field.default is not dataclasses.MISSING:
            out[field.name] = field.default
    return out
