"""Reading back a bioimage.io package that ``export_model.py`` wrote (``inference.py --model m.zip``).

Such a package holds the toolkit's ``model.keras`` (Keras' own layers) and ``model.json``
beside ``rdf.yaml``; they are extracted to a private temporary folder (removed when the
process exits) and used like a model folder. Packages written by other tools are refused
with a message saying so (reading them may follow later).

Nothing here imports :mod:`lib.model_folder` (which calls this module).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from ..common.errors import BadInput

RDF = "rdf.yaml"
MEMBERS = ("model.json", "model.keras")
_EXTRACTED: list[str] = []


class PackageError(BadInput, ValueError):
    """A .zip given as a model that is not a bioimage.io package exported by this toolkit."""


def _cleanup() -> None:
    for path in _EXTRACTED:
        shutil.rmtree(path, ignore_errors=True)


def extract_package(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(model.keras, model.json)`` extracted from the package at ``path`` into a private temporary folder.

    Raises :class:`PackageError` for a damaged zip or a package this toolkit did not write.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = [n for n in (RDF, *MEMBERS) if n not in names]
            if missing:
                raise PackageError(f"bioimage.io package must be one exported by export_model.py (holding {RDF}, "
                                   f"{' and '.join(MEMBERS)}); got {path} without {', '.join(missing)}. Packages "
                                   "from other tools are not read yet: run them in a bioimage.io tool")
            target = Path(tempfile.mkdtemp(prefix="bioimageio-model-"))
            if not _EXTRACTED:
                atexit.register(_cleanup)
            _EXTRACTED.append(str(target))
            for name in MEMBERS:
                (target / name).write_bytes(archive.read(name))
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PackageError(f"bioimage.io package must be a readable zip archive; got {type(exc).__name__}: {exc} "
                           f"in {path}") from None
    return target / MEMBERS[1], target / MEMBERS[0]
