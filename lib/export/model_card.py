"""What a model does, for people: ``model_card.md`` and a cover picture (input | prediction overlay).

:func:`write_model_card` writes both into a model folder (the trainer calls it at the end of a
run; ``export_model.py`` calls it too); :func:`card_text` is also the documentation of a
bioimage.io package. :func:`sample_tile` picks the image the cover (and a package's test
tensors) are computed on: ``--test_image`` when given, else the first record of the test
database recorded in ``model.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..common.errors import BadInput
from ..common.files import write_text
from ..common.pictures import OVERLAY_ALPHA, colour_labels, display_image, save_png
from ..inference.predictor import load_predictor
from ..instances.postprocess import PostProcessConfig, postprocess
from ..model_folder import MODEL_FILE, MODEL_JSON, ModelInfo, probability_planes, read_model_json
from ..store.images import read_image
from ..store.lmdb_store import LmdbReader

CARD = "model_card.md"
COVER = "cover.png"
# Side of the sample tile (rounded down to the size divisor; smaller images are used whole).
SAMPLE_SIDE = 256
# Records of the test database looked at for the sample (the one with the most labelled pixels wins).
SAMPLE_CANDIDATES = 64
PAPERS = {
    "unet": ("U-Net", "Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image "
             "Segmentation. MICCAI 2015, LNCS 9351, 234-241", "10.1007/978-3-319-24574-4_28",
             "https://arxiv.org/abs/1505.04597"),
    "fc-densenet": ("FC-DenseNet (Tiramisu)", "Jegou S, Drozdzal M, Vazquez D, Romero A, Bengio Y. The One Hundred "
                    "Layers Tiramisu: Fully Convolutional DenseNets for Semantic Segmentation. CVPR Workshops 2017",
                    "10.1109/CVPRW.2017.156", "https://arxiv.org/abs/1611.09326"),
    "fcn": ("FCN", "Long J, Shelhamer E, Darrell T. Fully Convolutional Networks for Semantic Segmentation. "
            "CVPR 2015, 3431-3440", "10.1109/CVPR.2015.7298965", "https://arxiv.org/abs/1411.4038"),
}


class ExportError(BadInput, ValueError):
    """A model folder or option that an export cannot use (names what and how to fix it)."""


def paper(architecture: str) -> tuple[str, str, str, str]:
    """(short name, citation, DOI, URL) of the paper an architecture comes from."""
    for prefix, entry in PAPERS.items():
        if architecture.startswith(prefix):
            return entry
    return (architecture, "", "", "")


def output_names(info: ModelInfo) -> list[str]:
    """Names of the model's output channels: instance channels, or class_0 (background), class_1, ..."""
    if info.label_kind == "instance":
        return list(info.channel_names)
    return [f"class_{k}" + (" (background)" if k == 0 else "") for k in range(info.number_classes)]


def sample_tile(info: ModelInfo, test_image: str | os.PathLike | None = None, side: int = SAMPLE_SIDE
                ) -> tuple[np.ndarray, str]:
    """A raw image tile (H, W, C) in the model's input dtype, H and W multiples of the divisor; and where it is from.

    From ``test_image`` (any image the toolkit reads) when given, else the first record of the
    test database named in ``model.json`` with the most labelled pixels (of its first
    :data:`SAMPLE_CANDIDATES`). The top-left ``side`` x ``side`` pixels (rounded down
    to the divisor) are kept. Raises :class:`ExportError` when there is no usable image.
    """
    if test_image is not None:
        image, where = read_image(test_image), str(test_image)
    else:
        database = info.meta.get("data", {}).get("test_database")
        if not database or not Path(database).is_dir():
            raise ExportError(f"test image must be given when the test database recorded in {info.path} is gone; "
                              f"got {database!r}. Pass --test_image IMAGE (an image like those the model was "
                              "trained on)")
        reader = LmdbReader(database)
        try:
            index = _busiest_record(reader)
            image = np.array(reader[index][0])
            where = f"{database} record {index} ({reader.tile_info(index)['key']})"
        finally:
            reader.close()
    divisor = info.size_divisor
    height, width = (min(side, n) // divisor * divisor for n in image.shape[:2])
    if image.ndim != 3 or image.shape[2] != info.input_channels or min(height, width) < divisor:
        raise ExportError(f"test image must be (H, W, {info.input_channels}) with H, W >= {divisor} (the model's "
                          f"input channels and size divisor); got shape {image.shape} in {where}")
    dtype = np.dtype(info.input_dtype)
    image = image[:height, :width]
    if image.dtype != dtype:
        if dtype.kind != "f" or image.dtype.kind != "f":
            raise ExportError(f"test image dtype must be {dtype.name} (the model's input_dtype); got "
                              f"{image.dtype.name} in {where}. Pass an image like those the model was trained on")
        image = image.astype(dtype)
    return np.ascontiguousarray(image), where


def _busiest_record(reader, candidates: int = SAMPLE_CANDIDATES) -> int:
    """Index of the record with the most labelled (non-zero) pixels among the first ``candidates``."""
    best, most = 0, -1.0
    for index in range(min(candidates, len(reader))):
        label = reader[index][1]
        share = float(np.count_nonzero(label)) / max(1, np.size(label)) if label is not None else 0.0
        if share > most:
            best, most = index, share
    return best


def prediction_labels(info: ModelInfo, maps: np.ndarray) -> np.ndarray:
    """Labels to draw from predicted maps (H, W, K): the class (semantic), or the objects of the model's
    own post-processing (instance; connected regions of its first probability plane when it records none)."""
    if info.label_kind == "semantic":
        return maps.argmax(axis=-1)
    from scipy import ndimage

    block = (info.meta.get("instance") or {}).get("postprocess")
    if block:
        return postprocess(np.asarray(maps, np.float32), PostProcessConfig.from_dict(block))
    planes = probability_planes(info.channel_names, info.channel_kinds)
    channel = planes.index(True) if any(planes) else 0
    return ndimage.label(maps[..., channel] > 0.5)[0]


def cover_picture(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, 2W + 8, 3) uint8: the image as displayed | the same with the labels tinted in (label colours)."""
    shown = display_image(image)
    tinted = shown.astype(np.float32)
    where = labels > 0
    tinted[where] = (1 - OVERLAY_ALPHA) * tinted[where] + OVERLAY_ALPHA * colour_labels(labels)[where]
    gap = np.full((shown.shape[0], 8, 3), 255, np.uint8)
    return np.concatenate([shown, gap, tinted.round().astype(np.uint8)], axis=1)


def _metrics_lines(best: dict) -> list[str]:
    lines = []
    for key in ("mean_iou", "mean_foreground_iou", "mean_dice", "pixel_accuracy", "f1", "panoptic_quality",
                "test_loss"):
        if isinstance(best.get(key), (int, float)):
            lines.append(f"| {key} | {best[key]:.4f} |")
    for key in ("iou", "dice"):
        if isinstance(best.get(key), list):
            lines.append(f"| {key} per class | {', '.join(f'{v:.3f}' for v in best[key])} |")
    if "step" in best:
        lines.append(f"| at step | {best['step']} |")
    return lines


def card_text(info: ModelInfo, sample_from: str | None = None) -> str:
    """The text of ``model_card.md`` for the model described by ``info`` (its model.json)."""
    meta = info.meta
    short, citation, doi, url = paper(info.architecture)
    data = meta.get("data", {}) or {}
    training = meta.get("training", {}) or {}
    lines = [f"# {info.architecture} {info.label_kind} segmentation model", "",
             f"Architecture: **{info.architecture}** ({short}) with options `{meta.get('model_options', {})}`; "
             f"input sizes must be multiples of {info.size_divisor} pixels; receptive-field radius "
             f"{info.receptive_field_radius} pixels (tiles overlap by that much for exact tiled prediction).", ""]
    if info.label_kind == "semantic":
        lines.append(f"Output: {info.number_classes} classes (softmax over logits): {', '.join(output_names(info))}.")
    else:
        kinds = ", ".join(f"{n} ({k})" for n, k in zip(info.channel_names, info.channel_kinds))
        lines.append(f"Output: instance channels {kinds}; binary and embedding channels through a sigmoid, "
                     "distance and ray channels clipped to [0, 1], class planes through a softmax, then the "
                     "toolkit's post-processing into objects.")
    lines += ["", f"Input: {info.input_channels} channel(s) of {info.input_dtype}.", "", "## Normalisation", ""]
    if info.normalization == "dataset":
        lines.append("Each channel is z-scored with the training statistics: (x - mean) / std with mean "
                     f"{list(info.mean)} and std {list(info.std)}.")
    elif info.normalization == "percentile":
        low, high = (info.meta.get("normalization") or {}).get("percentiles") or (1.0, 99.8)
        lines.append(f"Each image is scaled with its own per-channel percentiles: (x - p{low:g}) / (p{high:g} - "
                     f"p{low:g}), computed over the whole image, not clipped.")
    else:
        lines.append("Each image is z-scored with its own per-channel mean and standard deviation.")
    lines += ["", "## Training data", "",
              f"- dataset: {data.get('dataset_name')}; {data.get('train_records')} training tiles, "
              f"{data.get('test_records')} test tiles of {meta.get('patch_size', '?')} px patches",
              f"- databases: `{data.get('train_database')}`, `{data.get('test_database')}`",
              f"- built with: `{data.get('build_command')}`"]
    if data.get("class_pixel_counts"):
        lines.append(f"- class pixel counts: {data['class_pixel_counts']}")
    if training:
        lines.append(f"- training: {training.get('max_steps', '?')} steps max, batch {training.get('batch_size', '?')}, "
                     f"learning rate {training.get('learning_rate', '?')}, mixed precision {training.get('mixed_precision')}")
    lines.append(f"- run state: {info.run_state} ({info.stopped_because}); written {meta.get('created')} by toolkit "
                 f"{meta.get('toolkit_version')}")
    best = _metrics_lines(meta.get("best", {}) or {})
    if best:
        lines += ["", "## Validation", "", "Best metrics on the test database during training (the model saved is the "
                  "one of lowest test loss):", "", "| metric | value |", "| --- | --- |", *best]
    lines += ["", "## How to run it", "",
              "With this toolkit (exact tiled prediction, any image size):", "",
              "    python inference.py --model MODEL_FOLDER --image_folder IMAGES --output_folder PREDICTIONS", "",
              f"With Keras alone (no toolkit): `keras.saving.load_model('{MODEL_FILE}')` takes normalised "
              "float32 (B, H, W, C) images, H and W multiples of the divisor, and returns logits.", "",
              "In bioimage.io tools (Fiji/deepImageJ, ilastik, QuPath, napari, bioimageio.core): export a package with",
              "", "    python export_model.py --model MODEL_FOLDER --format bioimageio --output model.zip", "",
              "and open model.zip there; it carries the normalisation and the activation as bioimage.io operations."]
    if sample_from:
        lines += ["", f"Cover picture: `{COVER}`, input | prediction, on {sample_from}."]
    if citation:
        lines += ["", "## Citation", "", f"{citation}. doi:{doi} ({url})"]
    return "\n".join(lines) + "\n"


def predict_maps(folder: Path, image: np.ndarray) -> np.ndarray:
    """Our inference's maps (H, W, K) float32 for one raw tile, from the model folder's model.keras."""
    predictor = load_predictor(folder)
    maps, _ = predictor.predict_batch(image[None], predictor.image_statistics(image))  # per-image modes need them
    return maps[0]


def write_model_card(folder: str | os.PathLike, test_image: str | os.PathLike | None = None,
                     log: Callable[[str], None] = print, cover: bool = True) -> Path | None:
    """Write ``model_card.md`` and (``cover``) ``cover.png`` into a model folder; return the card's path.

    The cover is computed on :func:`sample_tile`; when no sample image can be found the card
    is written without a cover and ``log`` says why. The trainer writes the card alone (no
    prediction at the end of every run); the exports add the cover. Atomic writes.
    """
    folder = Path(folder)
    info = read_model_json(folder / MODEL_JSON)
    if not cover:
        return write_text(folder / CARD, card_text(info, None))
    try:
        image, where = sample_tile(info, test_image)
    except ExportError as exc:
        log(f"warning: no cover picture: {exc}")
        image, where = None, None
    if image is not None:
        save_png(folder / COVER, cover_picture(image, prediction_labels(info, predict_maps(folder, image))))
    return write_text(folder / CARD, card_text(info, where))
