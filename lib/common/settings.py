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
