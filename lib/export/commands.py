"""What ``export_model.py`` does: one model folder to a bioimage.io package, an ONNX file or a SavedModel.

Every format is float32 (the toolkit's exports are float32 graphs unless asked otherwise:
``--precision bfloat16`` for a SavedModel) and every output is written atomically (a file
through :mod:`lib.common.files`, a SavedModel folder under a temporary name, then swapped in).
An existing output is replaced only with ``overwrite``; an output inside the model folder is
refused (the folder is the input).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from ..common.errors import OutputError
from ..common.files import check_not_inside
from ..common.normalization import DEFAULT_PERCENTILES, image_statistics
from ..inference.predictor import normalize
from ..model_folder import MODEL_FILE, MODEL_JSON, ModelError, load_model, read_model_json
from .bioimageio import build_package
from .keras_standard import standard_model
from .model_card import ExportError, sample_tile, write_model_card
from .onnx_export import export_onnx
from .savedmodel import export_savedmodel

FORMATS = ("bioimageio", "onnx", "savedmodel")
SUFFIXES = {"bioimageio": ".zip", "onnx": ".onnx", "savedmodel": ""}


@dataclasses.dataclass
class ExportRequest:
    """One export: ``model`` folder, ``format``, ``output`` path and options."""

    model: str
    format: str
    output: str
    overwrite: bool = False
    test_image: str | None = None
    precision: str = "float32"
    name: str | None = None
    authors: list[str] = dataclasses.field(default_factory=list)
    license: str = "CC-BY-4.0"
    model_card: bool = True


def _check(request: ExportRequest) -> Path:
    """The model folder; raises :class:`ExportError` / :class:`OutputError` for bad settings (nothing written)."""
    folder = Path(request.model)
    if not (folder / MODEL_FILE).is_file() or not (folder / MODEL_JSON).is_file():
        raise ModelError(f"model must be a model folder holding {MODEL_FILE} and {MODEL_JSON}; got "
                         f"{request.model!r}. Pass the folder given to train_unet.py as --output_dir")
    if request.format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}; got {request.format!r}")
    if request.precision != "float32" and request.format != "savedmodel":
        raise ExportError(f"precision must be float32 for --format {request.format}; got {request.precision!r}. "
                          "Only a SavedModel can be exported in bfloat16")
    suffix = SUFFIXES[request.format]
    output = Path(request.output)
    if suffix and output.suffix.lower() != suffix:
        raise ExportError(f"output must end in {suffix} for --format {request.format}; got {request.output!r}")
    check_not_inside(output, {"model": folder}, "output")
    if output.exists() and not request.overwrite:
        raise OutputError(f"output must not exist (pass --overwrite to replace it); got {request.output!r}, which "
                          "exists")
    if output.exists() and (output.is_dir() != (request.format == "savedmodel")):
        raise OutputError(f"output must be a {'folder' if request.format == 'savedmodel' else 'file'} to be "
                          f"replaced; got {request.output!r}, which is not")
    if not output.parent.is_dir():
        raise OutputError(f"output's folder must exist; got {str(output.parent)!r}. Create it first")
    read_model_json(folder / MODEL_JSON)  # a bad model.json is refused before any work
    return folder


def export(request: ExportRequest, log: Callable[[str], None] = print) -> Path:
    """Run one export; return the output path. Raises a :class:`lib.common.errors.ToolkitError` subclass."""
    folder = _check(request)
    output = Path(request.output)
    if request.format == "bioimageio":
        options = {"name": request.name, "authors": request.authors, "license": request.license}
        build_package(folder, output, request.test_image, options, log)
    elif request.format == "onnx":
        info = read_model_json(folder / MODEL_JSON)
        image, _ = sample_tile(info, request.test_image)
        percentiles = (info.meta.get("normalization") or {}).get("percentiles") or DEFAULT_PERCENTILES
        sample = normalize(image[None], info, image_statistics(image, info.normalization, percentiles))
        export_onnx(standard_model(load_model(folder / MODEL_FILE)), sample, output)
    else:
        export_savedmodel(load_model(folder / MODEL_FILE), output, request.precision)
    if request.model_card:
        try:
            write_model_card(folder, request.test_image, log)
        except OSError as exc:  # a read-only model folder: the export itself is done
            log(f"warning: model_card.md not written in {folder} ({exc})")
    log(f"{request.format} export written: {output}")
    return output
