"""Which files of an inference output folder this tool wrote, and the fingerprint of the model that wrote them.

The manifest of a folder is spread over files that each process owns, so that shards writing
one folder at once never race on a shared list:

- ``inference.json``: the run's settings; its ``compared`` part (model path, model
  fingerprint, halo, TTA, ...) must match for a rerun to add images to the folder
  (:func:`lib.inference.folder_files.check_settings`);
- ``records/KEY.pending.json``: written before the first output of image ``KEY``, it lists
  every output the image is about to get; removed once the record is written;
- ``records/KEY.json``: written last, it lists the image's outputs and marks it done.

A file the run is about to write that exists but is listed by none of these is not this
tool's: the run refuses it (:func:`check_foreign`, exit 2) unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from ..common import files
from ..common.errors import OutputError

PENDING_SUFFIX = ".pending.json"
# Tables written at the end of a run into the folder itself (shard suffix added).
FOLDER_TABLES = ("uncertainty", "metrics", "instance_metrics")
CHUNK = 1 << 20


def model_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """SHA-256 over the bytes of ``paths`` (files, or every file below a folder, by relative path), in order.

    ``paths``: every member's ``model.json`` and model file (``model.keras`` or SavedModel
    folder). Two runs have the same fingerprint only when every byte of their models is equal.
    """
    digest = hashlib.sha256()
    for path in map(Path, paths):
        targets = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for target in targets:
            digest.update(str(target.relative_to(path) if path.is_dir() else target.name).encode() + b"\0")
            with open(target, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


def pending_path(record: Path) -> Path:
    return record.with_name(record.stem + PENDING_SUFFIX)


def _listed(out: Path, manifest: Path) -> set[Path] | None:
    """The outputs ``manifest`` (a record or pending file) lists, or None when it is not one of ours."""
    try:
        data = json.loads(manifest.read_text())
        return {out / rel for rel in data["outputs"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def owned(out: Path, paths: dict[str, Path]) -> set[Path]:
    """The paths of one image's outputs that its record or pending file lists (the manifests included)."""
    mine: set[Path] = set()
    for manifest in (paths["record"], pending_path(paths["record"])):
        listed = _listed(out, manifest) if manifest.is_file() else None
        if listed is not None:
            mine |= listed | {manifest}
    return mine


def claim(out: Path, paths: dict[str, Path]) -> None:
    """Write ``records/KEY.pending.json`` listing the outputs the image is about to get (before the first)."""
    files.write_json(pending_path(paths["record"]),
                     {"outputs": {name: str(p.relative_to(out)) for name, p in paths.items() if name != "record"}})


def release(paths: dict[str, Path]) -> None:
    """Remove the pending file of an image whose record is written."""
    pending_path(paths["record"]).unlink(missing_ok=True)


def _ours(settings: Path) -> bool:
    try:
        return isinstance(json.loads(settings.read_text()).get("compared"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def foreign_outputs(out: Path, settings_file: str, suffix: str, jobs: Iterable[dict[str, Path]]) -> list[Path]:
    """Files the run would write that exist and that no manifest of the folder lists.

    ``jobs``: the output paths of every image the run will predict (``ImageJob.paths``).
    """
    if not out.is_dir():
        return []
    foreign = []
    settings = out / settings_file
    if settings.exists() and not _ours(settings):
        foreign.append(settings)
    if not settings.exists():  # the folder tables are ours only in a folder this tool made
        foreign += [p for p in (out / f"{name}{suffix}.csv" for name in FOLDER_TABLES) if p.exists()]
    for paths in jobs:
        mine = owned(out, paths)
        foreign += [p for p in (*paths.values(), pending_path(paths["record"])) if p.exists() and p not in mine]
    return foreign


def check_foreign(out: Path, settings_file: str, suffix: str, jobs: Iterable[dict[str, Path]]) -> None:
    """Raise :class:`OutputError` naming every file the run would replace that this tool did not write."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_folder must be a folder; got a file {out}. Choose a new folder")
    foreign = foreign_outputs(out, settings_file, suffix, jobs)
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10
                                                            else "")
        raise OutputError(f"output_folder must not hold files this tool did not write where it writes; got "
                          f"{len(foreign)} such file(s) in {out}: {shown}. Pass --overwrite to replace them, or "
                          "choose a new folder")
