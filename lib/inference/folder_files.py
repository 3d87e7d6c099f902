"""The files of a whole folder run: ``inference.json`` (the settings, checked before adding images to a
folder) and the tables gathered from the images' records at the end (``uncertainty.csv``,
``metrics.csv``, ``instance_metrics.csv``), plus the run's opening lines to the user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common.errors import OutputError
from ..scoring.metrics import MatchStats, pool_stats
from ..scoring.reports import instance_metrics_rows, metrics_row, with_class_rows
from ..store.tiling import default_tile_pixels
from .outputs import save_table

if TYPE_CHECKING:
    from .runner import InferenceConfig, RunContext

SETTINGS_FILE = "inference.json"
# Values of settings that folders written before they were recorded were made with.
# Folders written before a setting was compared hold outputs made with the value it had then.
LEGACY_COMPARED = {"precision": "float32", "output_format": "tif", "pixel_size": None}


def shard_suffix(config: InferenceConfig) -> str:
    return "" if config.shard is None else f"-shard{config.shard[0]}of{config.shard[1]}"


def run_settings(context: RunContext) -> dict:
    """What ``inference.json`` records; its ``compared`` part must match to add images to a folder."""
    config, predictor, halo, post = context.config, context.predictor, context.halo, context.post
    radius, divisor = predictor.receptive_field_radius, predictor.size_divisor
    exact = halo >= radius
    settings = {
        "compared": {"model": predictor.source, "model_fingerprint": predictor.fingerprint, "halo": halo, "tta": config.tta,
                     "tile_size": None if exact else config.tile_size, "precision": predictor.precision,
                     "output_format": config.output_format, "pixel_size": config.pixel_size},
        "precision": predictor.precision,
        "config": config.to_dict(), "members": [m.info.path for m in predictor.members],
        "receptive_field_radius": radius, "size_divisor": divisor, "exact": exact,
        "label_kind": predictor.label_kind, "number_classes": predictor.number_classes,
        "tile_size_used": config.tile_size,  # None: rectangular tiles of at most tile_pixels_max (records/)
        "tile_pixels_max": (config.tile_size or 0) ** 2 or default_tile_pixels(halo, divisor, predictor.precision),
    }
    if post is not None:
        instance = {"channels": list(predictor.channel_names), "kinds": list(predictor.channel_kinds),
                    "postprocess": post.to_dict(), "filter_rules": config.filter_rules,
                    "pixel_size": config.pixel_size, "matching_thresholds": list(config.matching_thresholds),
                    "postprocess_window": config.postprocess_window,
                    "postprocess_overlap": config.postprocess_overlap}
        settings["compared"]["instance"] = settings["instance"] = instance
    return settings


def check_settings(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to mix outputs of different models or halos in one folder (unless overwriting)."""
    path = out / SETTINGS_FILE
    if overwrite or not path.is_file():
        return
    try:
        previous = json.loads(path.read_text()).get("compared", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    previous = {**LEGACY_COMPARED, **previous}
    differing = [k for k in settings["compared"] if previous.get(k) != settings["compared"][k]]
    if differing:
        shown = "; ".join(f"{k}: {previous.get(k)!r} -> {settings['compared'][k]!r}" for k in differing)
        raise OutputError(f"output_folder must hold outputs of these settings only; got a folder {out} made with "
                          f"others ({shown}). Use another --output_folder, or --overwrite to redo every image")


def announce(context: RunContext, n_images: int, n_masks: int) -> None:
    config, predictor, halo, post, log = context.config, context.predictor, context.halo, context.post, context.log
    radius, divisor = predictor.receptive_field_radius, predictor.size_divisor
    kind = (f"{predictor.number_classes} classes" if post is None else "instance channels " + ", ".join(
        f"{n} ({k})" for n, k in zip(predictor.channel_names, predictor.channel_kinds)))
    log(f"model {predictor.source}: {len(predictor.members)} member(s), {kind}, "
        f"divisor {divisor}, receptive-field radius {radius}; halo {halo} px "
        + ("(exact: tiled == whole-image)" if halo >= radius else
           f"(< radius {radius}: approximate near tile borders)")
        + (", test-time augmentation x8" if config.tta else "")
        + f"; {predictor.precision}" + (" (auto)" if config.precision == "auto" else ""))
    for member in predictor.members:
        info = member.info
        if info.run_state != "finished":
            log(f"warning: {info.path} is from a training run that is {info.run_state} (stopped because "
                f"{info.stopped_because or 'it is still running or was killed'}): its model is the best "
                "one saved so far, not a finished model. Rerun the training command to finish it")
    if post is not None:
        log("post-processing of the stitched maps: " + ", ".join(f"{k}={v}" for k, v in post.to_dict().items())
            + (f"; filter: remove {config.filter_rules}" if config.filter_rules else ""))
    log(f"{n_images} image(s) in {config.image_folder}" + (f" (shard {config.shard[0]}/{config.shard[1]})"
                                                         if config.shard else "")
        + (f", {n_masks} with masks" if config.mask_folder else "") + f" -> {context.out}")


def summaries(context: RunContext, keys: list[str], failed: dict[str, str]) -> dict[str, Any]:
    """``uncertainty.csv``, ``metrics.csv`` and ``instance_metrics.csv`` from the records of the images done."""
    out, suffix = context.out, shard_suffix(context.config)
    records = {}
    for key in keys:
        path = out / "records" / f"{key}.json"
        if key not in failed and path.is_file():
            records[key] = json.loads(path.read_text())
    uncertainty_rows = sorted(({"image": key, **record["scores"]} for key, record in records.items()),
                              key=lambda row: -row["mean_entropy"])
    found: dict[str, Any] = {"uncertainty_csv": save_table(out / f"uncertainty{suffix}.csv", uncertainty_rows)
                             if records else None, "overall": None, "metrics_csv": None,
                             "instance_overall": None, "instance_metrics_csv": None}
    evaluated = {k: np.asarray(r["confusion_matrix"]) for k, r in records.items() if r.get("confusion_matrix")}
    if evaluated:
        rows = [metrics_row(key, cm) for key, cm in evaluated.items()]
        found["overall"] = metrics_row("ALL", sum(evaluated.values()))
        found["metrics_csv"] = save_table(out / f"metrics{suffix}.csv", rows + [found["overall"]])
    matched = {k: r["instance_stats"] for k, r in records.items() if r.get("instance_stats")}
    if matched:
        tables = {k: {float(t): MatchStats(**d) for t, d in v.items()} for k, v in matched.items()}
        pooled = pool_stats(list(tables.values()))
        rows = [row for key, table in tables.items() for row in instance_metrics_rows(key, table)]
        found["instance_overall"] = pooled
        found["instance_metrics_csv"] = save_table(out / f"instance_metrics{suffix}.csv",
                                                   with_class_rows(rows + instance_metrics_rows("ALL", pooled),
                                                                   records))
    return found
