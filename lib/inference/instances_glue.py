"""Instance models at inference: post-processing settings, segmentation of the stitched maps, and the
outputs of one image (labels, measurements, probabilities, intermediates, evaluation).

Post-processing always runs on the maps of the whole image, never tile by tile: an object
crossing a tile border stays one object. Images longer than ``POSTPROCESS_WINDOW`` along an
axis are post-processed window by window (:func:`lib.instances.postprocess.postprocess_windowed`);
objects up to about a third of the overlap are then labelled exactly as on the whole image.

Labels and maps are OME-TIFFs (``--output_format tif``) or OME-Zarr images (``ome-zarr``), with the
job's pixel size (``--pixel_size``, else the input's metadata), which the measurements also use.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..common.settings import ConfigError
from ..instances.measure import measure, measurement_columns
from ..instances.postprocess import PostProcessConfig, postprocess, postprocess_windowed
from ..instances.rules import CLASS_PROPERTY, filter_instances, parse_rules
from ..model_folder import ModelError
from ..scoring.reports import (
    associations_rows,
    evaluate_instance_classes,
    evaluate_instances,
    matching_overlay,
    metrics_row,
)
from ..store.images import read_image, read_mask
from .outputs import save_image, save_png, save_rows
from .predictor import Predictor
from .sources import output_name
from .tiled import write_tiled_tiff

if TYPE_CHECKING:
    from .runner import ImageJob, InferenceConfig, RunContext

# Settings that only instance models take; given with a semantic model they are refused.
# --pixel_size is not among them: every model records it in its OME-TIFF / OME-Zarr outputs.
INSTANCE_SETTINGS = ("thresholds", "refinements", "filter_rules", "save_intermediates", "class_mask_folder")
# --thresholds keys of one post-processing method: (key, channel kind the model needs, what, which models)
METHOD_THRESHOLDS = (("nms", "ray", "the IoU of the polygon suppression", "that makes polygons (an R channel, StarDist)"),
                     ("seed", "embedding", "the seed score of the embedding clustering",
                      "with the E channels (EmbedSeg)"))

# Images whose height or width exceeds this are post-processed window by window.
POSTPROCESS_WINDOW = 4096
POSTPROCESS_OVERLAP = 256
# Intermediate images of the post-processing written by --save_intermediates.
INTERMEDIATES = ("seeds", "surface", "growth")


@dataclasses.dataclass
class InstanceSegmentation:
    """Instance labels of one image.

    labels : (H, W) uint16 or uint32, 0 = background, objects numbered in raster order
    intermediates : ``{"seeds": (H, W) int32, "surface": (H, W) float32, "growth": (H, W) bool,
        "thresholds": {name: number}}`` when asked for and the image was post-processed whole;
        else None
    windowed : whether the image was post-processed window by window
    """

    labels: np.ndarray
    intermediates: dict | None
    windowed: bool


def parse_thresholds(text: str) -> dict[str, float | str]:
    """``"F=0.5,Db=auto,growth=0.3"`` -> ``{"F": 0.5, "Db": "auto", "growth": 0.3}``.

    Names are channel names (seed thresholds), ``growth`` (the growth mask's threshold), ``nms``
    (the IoU of the polygon suppression of StarDist models) or ``seed`` (the seed score of
    embedding models); values are numbers in [0, 1] or ``auto`` (Otsu; not for ``nms``, ``seed``). Raises ``ValueError`` naming every bad item.
    """
    out: dict[str, float | str] = {}
    problems = []
    for item in [part.strip() for part in text.split(",")]:
        name, sep, value = (piece.strip() for piece in item.partition("="))
        if not sep or not name or not value:
            problems.append(f"each threshold must be NAME=VALUE (e.g. F=0.5 or Db=auto); got {item!r}")
            continue
        if name in out:
            problems.append(f"each threshold must be given once; got {name!r} twice")
        if value == "auto":
            out[name] = "auto"
            continue
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not 0.0 <= number <= 1.0:
            problems.append(f"threshold {name} must be a number in [0, 1] or auto; got {value!r}")
            continue
        out[name] = number
    if problems:
        raise ValueError("; ".join(problems))
    return out


def parse_refinements(text: str) -> tuple[str, ...]:
    """``"fill_holes,remove_small_objects 20"`` -> ``("fill_holes", "remove_small_objects 20")``; ``"none"`` -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(" ".join(step.split()) for step in text.split(","))


def postprocess_settings(predictor: Predictor, thresholds: dict[str, float | str] | None = None,
                         refinements: Sequence[str] | None = None) -> PostProcessConfig:
    """The post-processing of an instance predictor: model.json's, with overrides on top.

    The base is ``instance.postprocess`` of the first member's model.json
    (:meth:`lib.instances.postprocess.PostProcessConfig.default_for` its channels when absent).
    ``thresholds`` replace or add seed thresholds by channel name; the key ``growth`` sets the
    growth mask's threshold, ``nms`` the IoU threshold of the polygon suppression (``F,R`` models), ``seed``
    the seed score of the embedding clustering (``E`` models). ``refinements`` replace the model's list.

    Returns a validated :class:`lib.instances.postprocess.PostProcessConfig`. Raises :class:`ModelError`
    for a bad block in model.json, ``lib.common.settings.ConfigError`` for overrides that do not fit.
    """
    info = predictor.members[0].info
    block = info.meta.get("instance", {}).get("postprocess")
    try:
        base = PostProcessConfig.default_for(info.channel_names) if block is None else \
            PostProcessConfig.from_dict(block)
    except ConfigError as exc:
        raise ModelError(f"instance.postprocess must hold valid post-processing settings; got in {info.path}:\n"
                         + "\n".join(f"  - {p}" for p in exc.violations)) from None
    if tuple(base.channels) != info.channel_names:
        raise ModelError(f"instance.postprocess.channels must equal instance.channels {list(info.channel_names)}; "
                         f"got {list(base.channels)} in {info.path}")
    changes: dict[str, Any] = {}
    if thresholds:
        seeds = {k: v for k, v in thresholds.items() if k not in ("growth", "nms", "seed")}
        changes["thresholds"] = {**base.thresholds, **seeds}
        if "growth" in thresholds:
            changes["growth_threshold"] = thresholds["growth"]
        if "nms" in thresholds:
            changes["nms_threshold"] = thresholds["nms"]
        if "seed" in thresholds:
            changes["seed_score"] = thresholds["seed"]
    if refinements is not None:
        changes["refinements"] = tuple(refinements)
    config = dataclasses.replace(base, **changes)
    try:
        return config.validate()
    except ConfigError as exc:
        raise ConfigError([f"post-processing (model.json with --thresholds/--refinements) {v}"
                           for v in exc.violations]) from None


def segment_instances(maps, config: PostProcessConfig, window: int = POSTPROCESS_WINDOW,
                      overlap: int = POSTPROCESS_OVERLAP, intermediates: bool = False) -> InstanceSegmentation:
    """Instance labels from the stitched channel maps ``(H, W, K)`` of a whole image.

    Images larger than ``window`` along an axis go through
    :func:`lib.instances.postprocess.postprocess_windowed` (``maps`` may then be a memory map);
    smaller ones through :func:`lib.instances.postprocess.postprocess`.
    ``config``: :class:`lib.instances.postprocess.PostProcessConfig` (:func:`postprocess_settings`).
    """
    if maps.shape[0] > window or maps.shape[1] > window:
        return InstanceSegmentation(postprocess_windowed(maps, config, window=window, overlap=overlap), None, True)
    if intermediates:
        labels, extra = postprocess(np.asarray(maps), config, return_intermediates=True)
        return InstanceSegmentation(labels, extra, False)
    return InstanceSegmentation(postprocess(np.asarray(maps), config), None, False)


def instance_paths(context: "RunContext", key: str, plane_pixels: tuple[int, int], streamed: bool,
                   evaluate: bool) -> dict:
    """Every file one image of an instance model produces (see :func:`lib.inference.runner.run_inference`);
    the record last."""
    config, out = context.config, context.out
    height, width = plane_pixels
    windowed = height > config.postprocess_window or width > config.postprocess_window
    fmt = "ome-zarr" if config.output_format == "ome-zarr" else "tif"
    paths = {"labels": out / output_name(key, fmt), "measurements": out / f"{key}_instances.csv"}
    if class_names(context.predictor):
        paths["classes"] = out / output_name(f"{key}_classes", fmt)
    if config.probabilities:
        for name in context.predictor.channel_names:
            paths[f"probabilities_{name}"] = out / "probabilities" / output_name(f"{key}_{name}", fmt)
    if config.uncertainty and not streamed:
        paths["entropy"] = out / "uncertainty" / output_name(f"{key}_entropy", fmt)
        if context.predictor.samples > 1:
            paths["spread"] = out / "uncertainty" / output_name(f"{key}_spread", fmt)
    if config.save_intermediates and not windowed:
        for name in INTERMEDIATES:
            paths[name] = out / "intermediates" / f"{key}_{name}.tif"
    if evaluate:
        paths["associations"] = out / "associations" / f"{key}.csv"
        if not streamed:
            paths["overlay"] = out / "overlays" / f"{key}.png"
    paths["record"] = out / "records" / f"{key}.json"
    return paths


def finish_instances(context: "RunContext", job: "ImageJob", prediction, image) -> dict:
    """Segment, measure, filter, write and evaluate one image whose maps are predicted.

    ``prediction``: a :class:`lib.inference.tiled.Prediction` (maps in memory, or the memory map of
    a streamed image as its probabilities). Returns the record's entries.
    """
    config, paths, log = context.config, job.paths, context.log
    streamed = job.layout == "streamed"
    maps = prediction.probabilities
    record: dict[str, Any] = {}
    if streamed and config.uncertainty:
        log(f"note: {job.image_path.name} has {job.pixels / 1e6:.0f} Mpixel; its uncertainty maps are not written "
            "(scores only)")
    if prediction.entropy is not None and "entropy" in paths:
        save_image(paths["entropy"], prediction.entropy, job.pixel_size)
    if prediction.spread is not None and "spread" in paths:
        save_image(paths["spread"], prediction.spread, job.pixel_size)
    segmentation = segment_instances(maps, context.post, config.postprocess_window, config.postprocess_overlap,
                                     intermediates=config.save_intermediates)
    if config.save_intermediates and segmentation.windowed:
        log(f"note: {job.image_path.name} was post-processed window by window (larger than "
            f"{config.postprocess_window} px); its intermediates are not written")
    labels = segmentation.labels
    unit = measurement_pixel_size(config, job.pixel_size)
    if config.pixel_size is None and job.pixel_size is not None:
        log(f"note: {job.image_path.name}: measurements in {_unit_source(config, job.pixel_size, unit)}")
    rows = measure(labels, unit)
    columns = list(measurement_columns(unit))
    names = class_names(context.predictor)
    pred_classes = instance_classes(labels, maps, len(names)) if names else {}
    if names:
        for row in rows:
            row["class"] = names[pred_classes.get(int(row["label"]), 0)]
        columns.insert(1, "class")
    found = len(rows)
    if config.filter_rules:
        labels, rows = filter_instances(labels, rows, config.filter_rules)
        columns.append("status")
    save_rows(paths["measurements"], rows, columns)
    write_big = write_tiled_tiff if streamed else save_image  # both: OME-TIFF or OME-Zarr by the path
    write_big(paths["labels"], labels, job.pixel_size)
    if "classes" in paths:  # kept objects only: filtered ones are 0 in labels
        write_big(paths["classes"], class_map(labels, pred_classes, len(names)), job.pixel_size)
    for k, name in enumerate(context.predictor.channel_names):
        if f"probabilities_{name}" in paths:
            write_big(paths[f"probabilities_{name}"], maps[..., k], job.pixel_size)
    if segmentation.intermediates is not None:
        extra = segmentation.intermediates
        save_image(paths["seeds"], extra["seeds"].astype(np.uint32), job.pixel_size)
        save_image(paths["surface"], extra["surface"].astype(np.float32), job.pixel_size)
        save_image(paths["growth"], extra["growth"].astype(np.uint8), job.pixel_size)
        record["resolved_thresholds"] = extra["thresholds"]
    kept = sum(row.get("status", "kept") == "kept" for row in rows)
    record["instances"] = {"found": found, "kept": kept, "removed": found - kept,
                           "label_dtype": labels.dtype.name, "windowed": segmentation.windowed,
                           "measurement_pixel_size": unit}
    if job.mask_path is not None:
        record.update(evaluate_instances_one(context, job, image, labels))
        if names:
            record.update(_evaluate_classes(context, job, labels, pred_classes, names))
    return record


def class_names(predictor: Predictor) -> tuple[str, ...]:
    """The class names (background first) of a model with a class per instance (planes K0.. of kind
    "class"); () for any other model."""
    info = predictor.members[0].info
    n = sum(kind == "class" for kind in info.channel_kinds)
    if not n:
        return ()
    names = ((info.meta.get("instance") or {}).get("targets") or {}).get("class_names") or []
    return tuple(names) if len(names) == n else ("background",) + tuple(f"class {i}" for i in range(1, n))


def instance_classes(labels: np.ndarray, maps, n_classes: int, rows_per_block: int = 1024) -> dict[int, int]:
    """The class of each instance: the majority, over its pixels, of the most probable object class
    (planes K1.. of the class head, the last ``n_classes`` maps; an instance is an object, so K0 is left
    out). ``maps`` may be a memory map: read in blocks of rows."""
    counts: dict[tuple[int, int], int] = {}
    for y in range(0, labels.shape[0], rows_per_block):
        block = np.asarray(labels[y:y + rows_per_block])
        inside = block > 0
        if not inside.any():
            continue
        best = np.asarray(maps[y:y + rows_per_block, :, -(n_classes - 1):]).argmax(axis=-1) + 1
        ids, cls = block[inside].astype(np.int64), best[inside].astype(np.int64)
        pairs, n = np.unique(ids * n_classes + cls, return_counts=True)
        for p, c in zip(pairs.tolist(), n.tolist()):
            counts[divmod(p, n_classes)] = counts.get(divmod(p, n_classes), 0) + c
    out: dict[int, tuple[int, int]] = {}
    for (i, c), n in sorted(counts.items()):
        if i not in out or n > out[i][1]:
            out[i] = (c, n)
    return {i: c for i, (c, _) in out.items()}


def class_map(labels: np.ndarray, classes: dict[int, int], n_classes: int) -> np.ndarray:
    """``(H, W)`` uint8 (uint16 beyond 255 classes): the class of each pixel's instance, 0 on background."""
    table = np.zeros(int(labels.max(initial=0)) + 1, np.uint8 if n_classes <= 256 else np.uint16)
    for i, c in classes.items():
        if i < table.size:
            table[i] = c
    return table[labels]


def _evaluate_classes(context: "RunContext", job: "ImageJob", labels: np.ndarray, pred_classes: dict[int, int],
                      names: Sequence[str]) -> dict:
    """Matching per class against a two-channel truth mask (ids, classes), or a one-channel one and its
    class mask of the same name in ``--class_mask_folder``; nothing for a one-channel mask alone."""
    folder = context.config.class_mask_folder
    if folder is not None:
        class_path = Path(folder) / job.mask_path.name
        if not class_path.is_file():
            context.log(f"note: no class mask {class_path} for {job.mask_path.name}: matching over all classes only")
            return {}
        ids, classes = read_mask(job.mask_path, binary_255=False), read_mask(class_path, binary_255=False)
        if classes.shape != ids.shape:
            raise ValueError(f"class mask must have the shape of its instance mask {ids.shape}; got "
                             f"{classes.shape} in {class_path}")
    else:
        truth = read_image(job.mask_path)
        if truth.shape[2] != 2 or job.mask_path.suffix.lower() not in (".tif", ".tiff"):  # 2-channel PNG: grey+alpha
            context.log(f"note: {job.mask_path.name} has no class channel (a two-channel TIFF: ids, classes, or "
                        "--class_mask_folder): matching over all classes only")
            return {}
        ids, classes = read_mask(job.mask_path, binary_255=False), truth[..., 1]
    stats = evaluate_instance_classes(labels, pred_classes, ids, classes, names,
                                      context.config.matching_thresholds)
    return {"instance_class_stats": stats}


def evaluate_instances_one(context: "RunContext", job: "ImageJob", image, labels: np.ndarray) -> dict:
    """Match the instances of one image with its instance mask; write its associations (and overlay)."""
    mask_path, paths = job.mask_path, job.paths
    mask = read_mask(mask_path, binary_255=False)
    try:
        matching, cm = evaluate_instances(labels, mask, context.config.matching_thresholds)
    except ValueError as exc:
        raise ValueError(f"{exc} in {mask_path}") from None
    rows = [row for t in matching.thresholds for row in associations_rows(matching, job.key, t)]
    save_rows(paths["associations"], rows)
    if "overlay" in paths:
        levels = matching.thresholds
        shown = 0.5 if 0.5 in levels else levels[len(levels) // 2]
        save_png(paths["overlay"], matching_overlay(np.asarray(image), mask, labels, matching, threshold=shown,
                                                    readable=True))
    else:
        context.log(f"note: {mask_path.name}: no overlay for an image of {labels.size / 1e6:.0f} Mpixel")
    row = metrics_row("", cm)
    return {"mask": str(mask_path), "confusion_matrix": cm.tolist(),
            "metrics": {k: v for k, v in row.items() if k != "image"},
            "instance_stats": {str(t): s.as_dict() for t, s in matching.stats.items()}}


def instance_settings(predictor: Predictor, config: InferenceConfig) -> PostProcessConfig | None:
    """The post-processing of an instance predictor (None for a semantic one, refusing instance-only settings)."""
    if predictor.label_kind == "semantic":
        given = [f"{name} applies to instance models only; got {getattr(config, name)!r} with a semantic model "
                 f"({predictor.source})" for name in INSTANCE_SETTINGS if getattr(config, name) not in (None, False)]
        if given:
            raise ConfigError(given)
        return None
    if config.output_format not in ("tif", "ome-zarr"):
        raise ConfigError([f"output_format must be tif for an instance model, or ome-zarr (its labels may need "
                           f"uint32, which PNG cannot hold); got {config.output_format!r}"])
    for key, kind, what, model in METHOD_THRESHOLDS:
        if config.thresholds and key in config.thresholds and kind not in predictor.channel_kinds:
            raise ConfigError([f"thresholds {key} ({what}) applies only to a model {model}; got "
                               f"{key}={config.thresholds[key]!r} with the channels "
                               f"{','.join(predictor.channel_names)} of {predictor.source}. Leave {key} out"])
    if config.class_mask_folder is not None and not class_names(predictor):
        raise ConfigError([f"class_mask_folder gives true classes, but {predictor.source} has no class per instance "
                           f"(it was trained without instance classes); got {config.class_mask_folder!r}. Leave it out"])
    rules = parse_rules(config.filter_rules) if config.filter_rules else None
    if rules is not None and CLASS_PROPERTY in rules.properties:
        names = class_names(predictor)
        if not names:
            raise ConfigError([f"filter_rules name the class, but {predictor.source} has no class per instance (it "
                               f"was trained without instance classes); got {config.filter_rules!r}. Leave the class "
                               "out"])
        named = {str(c.value) for group in rules.groups for c in group if c.property == CLASS_PROPERTY}
        unknown = sorted(named - set(names[1:]))
        if unknown:
            raise ConfigError([f"filter_rules must name classes of the model ({', '.join(map(repr, names[1:]))}; "
                               f"in quotes when a name has spaces: class == \"class 1\"); got {', '.join(map(repr, unknown))}"])
    return postprocess_settings(predictor, config.thresholds, config.refinements)


def measurement_pixel_size(config: "InferenceConfig", image_pixel_size: tuple[float, float] | None) -> float | None:
    """The side of a pixel in µm for the measurements: ``--pixel_size``, else the input's own (OME-TIFF
    PhysicalSize / OME-Zarr scale) when its pixels are square and no ``--filter_rules`` were given (those
    were checked against the pixel-unit columns), else None (pixel units)."""
    if config.pixel_size is not None:
        return float(config.pixel_size)
    if image_pixel_size is None or config.filter_rules:
        return None
    y, x = image_pixel_size
    return float(x) if math.isclose(y, x, rel_tol=1e-6) else None


def _unit_source(config: "InferenceConfig", image_pixel_size: tuple[float, float], unit: float | None) -> str:
    """Which unit the measurements of an image with a recorded pixel size use, and why (no --pixel_size given)."""
    if unit is not None:
        return f"um ({unit:g} um per pixel from the image's metadata)"
    why = "--filter_rules are in pixel units" if config.filter_rules else "its pixels are not square"
    return f"pixels (the image records {image_pixel_size[1]:g} x {image_pixel_size[0]:g} um, but {why})"
