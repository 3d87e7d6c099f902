"""Typed, validated settings. Each concern is a frozen dataclass whose ``validate()`` collects
every violation and raises one :class:`ConfigError` with a line per field."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Invalid settings: ``violations`` lists one message per bad field."""

    def __init__(self, violations: list[str]):
        self.violations = list(violations)
        super().__init__("invalid settings:\n" + "\n".join(f"  - {v}" for v in self.violations))


def _from_dict(cls, values: dict[str, Any]):
    """Build ``cls`` from a dict, rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError([f"unknown setting {k!r} for {cls.__name__}; known: {', '.join(sorted(names))}"
                           for k in unknown])
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Settings of a database build (``build_lmdb.py``)."""

    image_folder: str
    mask_folder: str
    output_folder: str
    dataset_name: str
    train_fraction: float = 0.8
    image_format: str | None = None
    use_tiling: bool = True
    tile_size: int = 256
    stride: int | None = None  # None: equal to tile_size (no overlap)
    mask_suffix: str | None = None
    number_classes: int | None = None
    mask_type: str = "semantic"
    seed: int = 0
    folds: int = 0
    workers: int = 2
    overwrite: bool = False

    @property
    def effective_stride(self) -> int:
        return self.tile_size if self.stride is None else self.stride

    def validate(self) -> "BuildConfig":
        """Return self, or raise ``ConfigError`` listing every invalid field."""
        v = []
        if not Path(self.image_folder).is_dir():
            v.append(f"image_folder must be an existing folder; got {self.image_folder!r}")
        if not Path(self.mask_folder).is_dir():
            v.append(f"mask_folder must be an existing folder; got {self.mask_folder!r}")
        out = Path(self.output_folder)
        if out.exists() and not out.is_dir():
            v.append(f"output_folder must be a folder; got {self.output_folder!r}, which is a file")
        if not self.dataset_name or any(c in self.dataset_name for c in "/\\\0") or self.dataset_name.startswith("."):
            v.append(f"dataset_name must be a plain file-name part (no '/', not starting with '.'); "
                     f"got {self.dataset_name!r}")
        if not 0.0 < self.train_fraction <= 1.0:
            v.append(f"train_fraction must be in (0, 1]; got {self.train_fraction}")
        if self.tile_size < 1:
            v.append(f"tile_size must be a positive number of pixels; got {self.tile_size}")
        if self.stride is not None and not 1 <= self.stride <= max(self.tile_size, 1):
            v.append(f"stride must be in [1, tile_size={self.tile_size}] so that tiles cover each image; "
                     f"got {self.stride}")
        if self.number_classes is not None and self.number_classes < 2:
            v.append(f"number_classes must be >= 2 (background and at least one class); got {self.number_classes}")
        if self.mask_type not in ("semantic", "instance"):
            v.append(f"mask_type must be 'semantic' or 'instance'; got {self.mask_type!r}")
        if self.folds < 0 or self.folds == 1:
            v.append(f"folds must be 0 (no k-fold assignment) or >= 2; got {self.folds}")
        if self.workers < 0:
            v.append(f"workers must be >= 0 (0 = in this process); got {self.workers}")
        if v:
            raise ConfigError(v)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BuildConfig":
        return _from_dict(cls, values)


def flag_bool(text: str) -> bool:
    """Parse a command-line truth value as NIST's scripts take them: 1/0, true/false, yes/no, on/off."""
    import argparse

    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be one of 1/0, true/false, yes/no; got {text!r}")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
