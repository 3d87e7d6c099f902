"""What a finished run no longer needs: the fallback checkpoint and leftovers of interrupted writes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from .. import model_folder


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def prune_checkpoints(out: Path, log: Callable[[str], None]) -> None:
    """At the end of a run, keep only what resuming or extending it needs: checkpoint/ (the final
    one) stays; checkpoint.previous/ (the fallback while training) and leftovers of interrupted
    writes go (``--keep_checkpoints`` keeps them)."""
    removed = 0
    for name in (model_folder.CHECKPOINT_PREVIOUS, f".{model_folder.CHECKPOINT}.partial",
                 f".{model_folder.CHECKPOINT}.old", f".{model_folder.CHECKPOINT_PREVIOUS}.old"):
        path = out / name
        if path.is_dir() and (out / model_folder.CHECKPOINT).is_dir():
            removed += folder_bytes(path)
            shutil.rmtree(path)
    if removed:
        log(f"removed {model_folder.CHECKPOINT_PREVIOUS}/ ({removed / 1e6:.1f} MB): {model_folder.CHECKPOINT}/ holds "
            "what a rerun needs to extend the run (--keep_checkpoints keeps it)")
