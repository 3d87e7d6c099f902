"""A bioimage.io model package (model spec 0.5) from a model folder, and reading one back.

The package is a zip holding ``rdf.yaml`` and the files it names:

- weights: ``model.keras`` (``keras_v3``: Keras' own layers, float32), ``tf_saved_model.zip``
  (``tensorflow_saved_model_bundle``, zipped SavedModel, float32), and ``model.onnx`` where
  tf2onnx converts the model and onnxruntime reproduces it (:mod:`.onnx_export`);
- ``test_input.npy`` (a raw tile in the model's input dtype, axes b, y, x, c) and
  ``test_output.npy`` (our inference's probabilities or channel maps on it);
- ``cover.png`` (input | prediction), ``README.md`` (the model card), ``model.json``.

Axes ``batch, y, x, channel``; y and x take ``min + n * step`` pixels with ``step`` the size
divisor; the output's halo is the receptive-field radius rounded up to the divisor (cropped
from each side by tools that tile). Pre-processing in the spec's own operations: ``ensure_dtype``
float32 then ``fixed_zero_mean_unit_variance`` with the training statistics along the channel
axis ("dataset" normalisation) or ``zero_mean_unit_variance`` over y and x ("tile"
normalisation: each image with its own statistics). Post-processing: ``softmax`` over the
channels (semantic) or ``sigmoid`` (instance models whose channels are all binary; distance
channels have no spec operation and stay raw).

:mod:`.package_reader` reads such a package back (``inference.py --model m.zip``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..common.files import write_with
from ..common.normalization import DEFAULT_PERCENTILES, image_statistics
from ..common.pictures import save_png
from ..inference.predictor import normalize
from ..model_folder import MODEL_FILE, MODEL_JSON, ModelInfo, load_model, read_model_json
from .keras_standard import standard_model
from .model_card import (
    SAMPLE_SIDE,
    ExportError,
    card_text,
    cover_picture,
    output_names,
    paper,
    predict_maps,
    prediction_labels,
    sample_tile,
)
from .onnx_export import OnnxUnavailable, convert_checked
from .savedmodel import export_savedmodel

SPEC_VERSION = "0.5.4"
from .package_reader import RDF  # noqa: E402  (the name the reader looks for)

SAVED_MODEL_ZIP = "tf_saved_model.zip"
ONNX_FILE = "model.onnx"
INPUT_ID, OUTPUT_ID = "image", "prediction"


# A small YAML writer (block style; strings quoted as JSON, which YAML reads as double-quoted scalars).


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(str(value), ensure_ascii=False)


def to_yaml(value: Any, indent: int = 0) -> str:
    """``value`` (dicts, lists, scalars) as block-style YAML text."""
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item) if not isinstance(item, (dict, list)) else json.dumps(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)) and item:
                inner = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {inner.lstrip()}")
            else:
                lines.append(f"{pad}- {_scalar(item) if not isinstance(item, (dict, list)) else json.dumps(item)}")
    else:
        lines.append(pad + _scalar(value))
    return "\n".join(lines)


# The description


def _file(name: str, data: bytes) -> dict:
    return {"source": name, "sha256": hashlib.sha256(data).hexdigest()}


def geometry(info: ModelInfo) -> tuple[int, int, int]:
    """(min size, step, halo) of the y and x axes: step the divisor, halo the radius rounded up to it."""
    step = info.size_divisor
    halo = max(step, math.ceil(info.receptive_field_radius / step) * step)
    return 2 * halo + step, step, halo


def _preprocessing(info: ModelInfo) -> list[dict]:
    steps: list[dict] = [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
    if info.normalization == "dataset":
        std = [s if s > 0 else 1.0 for s in info.std]  # a zero std divides by 1, as in our inference
        steps.append({"id": "fixed_zero_mean_unit_variance",
                      "kwargs": {"mean": list(info.mean), "std": std, "axis": "channel"}})
    elif info.normalization == "tile":
        steps.append({"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"]}})
    elif info.normalization == "percentile":
        # (x - p_low) / (p_high - p_low + eps) per channel over the whole image: our percentile
        # normalisation (not clipped; ours divides by 1 where p_high - p_low < 1e-6 instead of adding eps).
        low, high = (info.meta.get("normalization") or {}).get("percentiles") or DEFAULT_PERCENTILES
        steps.append({"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": float(low),
                                                      "max_percentile": float(high), "eps": 1e-6}})
    else:
        raise ExportError(f"normalization mode must be 'dataset', 'tile' or 'percentile' for a bioimage.io export; got "
                          f"{info.normalization!r} in {info.path}")
    # Without a closing ensure_dtype the spec appends one back to the input's own dtype (data.type).
    return steps + [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]


def _postprocessing(info: ModelInfo) -> tuple[list[dict], str]:
    if info.label_kind == "semantic":
        return [{"id": "softmax", "kwargs": {"axis": "channel"}}], "class probabilities (softmax over the channels)"
    if all(kind in ("binary", "embedding") for kind in info.channel_kinds):
        return [{"id": "sigmoid"}], ("instance channel maps through a sigmoid (probabilities; for embedding planes "
                                     "offsets, bandwidths and seediness in [0, 1])")
    return [], ("instance channel logits: apply a sigmoid to the binary and embedding channels, a softmax over the "
                "class planes, and clip the distance and ray channels to [0, 1] (no bioimage.io operation does this "
                "per channel)")


def describe(info: ModelInfo, files: dict[str, bytes], weights: dict[str, dict], options: dict) -> dict:
    """The rdf.yaml content for ``info`` with the package ``files`` (name -> bytes) and ``weights`` entries."""
    min_size, step, halo = geometry(info)
    short, citation, doi, url = paper(info.architecture)
    post, output_description = _postprocessing(info)
    data = info.meta.get("data", {}) or {}
    space = [{"type": "space", "id": axis, "size": {"min": min_size, "step": step}} for axis in ("y", "x")]
    out_space = [{"type": "space", "id": axis, "size": {"tensor_id": INPUT_ID, "axis_id": axis}, "halo": halo}
                 for axis in ("y", "x")]
    cite = [{"text": citation, "doi": doi}] if citation else [{"text": "segmentation toolkit", "url": options["url"]}]
    description = {
        "type": "model", "format_version": SPEC_VERSION,
        "name": options.get("name") or f"{short} {info.label_kind} segmentation ({data.get('dataset_name') or 'model'})",
        "description": (f"{info.architecture} {info.label_kind} segmentation of {info.input_channels}-channel "
                        f"{info.input_dtype} microscopy images into {', '.join(output_names(info))}; trained with "
                        "the segmentation toolkit"),
        "authors": [{"name": name} for name in options.get("authors") or []],
        "cite": cite,
        "license": options.get("license") or "CC-BY-4.0",
        "tags": ["segmentation", "2d", "tensorflow", "keras", info.architecture, info.label_kind],
        "documentation": "README.md",
        "covers": ["cover.png"],
        "attachments": [_file(MODEL_JSON, files[MODEL_JSON])],
        "inputs": [{
            "id": INPUT_ID, "description": "raw image (not normalised); sizes min + n * step",
            "axes": [{"type": "batch"}, *space,
                     {"type": "channel", "channel_names": [f"c{k}" for k in range(info.input_channels)]}],
            "test_tensor": _file("test_input.npy", files["test_input.npy"]),
            "sample_tensor": _file("sample_input.tif", files["sample_input.tif"]),
            "data": {"type": np.dtype(info.input_dtype).name},
            "preprocessing": _preprocessing(info)}],
        "outputs": [{
            "id": OUTPUT_ID, "description": output_description[:128],
            "axes": [{"type": "batch"}, *out_space, {"type": "channel", "channel_names": output_names(info)}],
            "test_tensor": _file("test_output.npy", files["test_output.npy"]),
            "sample_tensor": _file("sample_output.tif", files["sample_output.tif"]),
            "data": {"type": "float32"},
            "postprocessing": post}],
        "weights": weights,
        "config": {"segmentation_toolkit": {
            "model_json": MODEL_JSON, "normalization": info.normalization,
            "receptive_field_radius": info.receptive_field_radius, "size_divisor": info.size_divisor,
            "training_data": {k: data.get(k) for k in ("dataset_name", "train_records", "test_records",
                                                        "train_database", "test_database", "build_command")},
            "best_metrics": info.meta.get("best", {})}},
    }
    if not description["authors"]:
        del description["authors"]
    return description


# Writing


def _zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def _weights(folder: Path, scratch: Path, files: dict[str, bytes], sample: np.ndarray,
             log: Callable[[str], None]) -> dict[str, dict]:
    """Write the weight files into ``files``; return the rdf ``weights`` entries.

    ``sample``: a normalised float32 batch on which ONNX must reproduce the Keras logits.
    """
    import keras
    import tensorflow as tf


    model = standard_model(load_model(folder / MODEL_FILE))
    keras_path = scratch / MODEL_FILE
    model.save(keras_path)
    files[MODEL_FILE] = keras_path.read_bytes()
    weights = {"keras_v3": {**_file(MODEL_FILE, files[MODEL_FILE]), "keras_version": keras.__version__,
                            "backend": ["tensorflow", tf.__version__]}}
    export_savedmodel(model, scratch / "saved_model")
    files[SAVED_MODEL_ZIP] = _zip_folder(scratch / "saved_model")
    weights["tensorflow_saved_model_bundle"] = {**_file(SAVED_MODEL_ZIP, files[SAVED_MODEL_ZIP]),
                                                "tensorflow_version": tf.__version__, "parent": "keras_v3"}
    try:
        onnx_bytes, opset = convert_checked(model, sample)
    except OnnxUnavailable as exc:
        log(f"note: no ONNX weights in the package: {exc}")
    else:
        files[ONNX_FILE] = onnx_bytes
        weights["onnx"] = {**_file(ONNX_FILE, onnx_bytes), "opset_version": opset, "parent": "keras_v3"}
    return weights


def build_package(folder: str | os.PathLike, output: str | os.PathLike, test_image: str | os.PathLike | None = None,
                  options: dict | None = None, log: Callable[[str], None] = print) -> Path:
    """Write the bioimage.io package of the model folder ``folder`` as the zip ``output`` (atomic).

    ``options``: ``name``, ``authors`` (list of names), ``license`` (SPDX id, default CC-BY-4.0).
    Raises :class:`ExportError` when the folder cannot be exported (no sample image, unknown
    normalisation).
    """
    folder = Path(folder)
    info = read_model_json(folder / MODEL_JSON)
    options = {"url": "https://bioimage.io", **(options or {})}
    _preprocessing(info)  # refuse unknown normalisations before any work
    min_size = geometry(info)[0]
    image, where = sample_tile(info, test_image, side=max(SAMPLE_SIDE, min_size))
    image = at_least(image, min_size)
    maps = predict_maps(folder, image)
    files: dict[str, bytes] = {MODEL_JSON: (folder / MODEL_JSON).read_bytes()}
    files["test_input.npy"] = _npy(image[None])
    post, _ = _postprocessing(info)
    percentiles = (info.meta.get("normalization") or {}).get("percentiles") or DEFAULT_PERCENTILES
    statistics = image_statistics(image, info.normalization, percentiles)
    sample = normalize(image[None], info, statistics)
    if not post:  # no spec operation: the package's output is the logits
        import keras

        logits = load_model(folder / MODEL_FILE)(sample, training=False)
        maps = np.asarray(keras.ops.convert_to_numpy(logits), np.float32)[0]
    files["test_output.npy"] = _npy(maps[None].astype(np.float32))
    files["sample_input.tif"] = _tif(image[None])
    files["sample_output.tif"] = _tif(maps[None].astype(np.float32))
    cover = cover_picture(image, prediction_labels(info, maps))
    with tempfile.TemporaryDirectory(prefix="bioimageio-export-") as scratch:
        scratch = Path(scratch)
        save_png(scratch / "cover.png", cover)
        files["cover.png"] = (scratch / "cover.png").read_bytes()
        files["README.md"] = card_text(info, where).replace("Cover picture: `cover.png`", "Cover picture").encode()
        weights = _weights(folder, scratch, files, sample, log)
    rdf = describe(info, files, weights, options)
    text = "# bioimage.io model description (spec 0.5) written by export_model.py\n" + to_yaml(rdf) + "\n"

    def write(path: Path) -> None:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(RDF, text)
            for name, data in files.items():
                archive.writestr(name, data)

    return write_with(Path(output), write, suffix=".zip")


def at_least(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` (H, W, C) mirrored at its bottom and right edges up to ``size`` pixels where it is smaller.

    bioimage.io tools run the test input as it is, so it must have the minimum size of the
    axes (twice the halo plus one step), which can exceed a database tile.
    """
    pad = [(0, max(0, size - image.shape[0])), (0, max(0, size - image.shape[1])), (0, 0)]
    while any(after for _, after in pad[:2]):  # "symmetric" reaches at most one image length per call
        step = [(0, min(after, n)) for (_, after), n in zip(pad[:2], image.shape[:2])] + [(0, 0)]
        image = np.pad(image, step, mode="symmetric")
        pad = [(0, max(0, size - image.shape[0])), (0, max(0, size - image.shape[1])), (0, 0)]
    return np.ascontiguousarray(image)


def _tif(array: np.ndarray) -> bytes:
    """A TIFF of ``array`` (1, H, W, C): the sample tensors that bioimage.io tools display."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ascontiguousarray(array))
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()
