"""Evaluation passes over the test database, and the post-processing tuning of instance models.

Each pass is exact: every test record once, in order (the reader's test mode). A semantic
model is scored by its confusion matrix; an instance model by its per-channel test losses,
then by matching the objects grown from its maps (the post-processing inference uses) with
the true ones at IoU 0.5.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import model_folder
from ..instances.postprocess import PostProcessConfig, postprocess
from ..reader.targets_describe import plane_groups
from ..scoring.metrics import confusion_matrix, match_instances, pool_stats, scores
from .config import TrainConfig
from .losses import instance_activations

# IoU thresholds of the matching statistics reported at each evaluation of an instance model.
EVAL_MATCHING_THRESHOLDS = (0.5,)
# Post-processing settings tried on the validation tiles at the end of an instance run.
TUNING_SEED_THRESHOLDS = {"Db": (0.3, 0.4, 0.5, 0.6, 0.7), "C": (0.2, 0.3, 0.5, 0.7), "P": (0.3, 0.5, 0.7),
                          "T": (0.3, 0.5, 0.7)}
TUNING_MIN_SEED_SIZES = (5, 20)
# the setting of each instance method beyond the watershed that the tuning varies, and its values
TUNING_METHOD_SETTINGS = {"polygons": ("nms_threshold", (0.3, 0.4, 0.5)),
                          "embedding": ("seed_score", (0.6, 0.75, 0.9))}
TUNING_MAX_TILES = 128


def postprocess_defaults(spec) -> PostProcessConfig:
    """The post-processing settings recorded with an instance model (and used at each evaluation)."""
    return PostProcessConfig.default_for(spec.channels)


def evaluate(config: TrainConfig, test_reader, eval_step) -> dict:
    """One exact pass over the test database: ``test_loss``, the metrics of the log, and ``scores``."""
    if config.target == "instance":
        return _evaluate_instances(config.target_spec(), test_reader, eval_step)
    cm = np.zeros((config.number_classes, config.number_classes), np.int64)
    loss_sum, n = 0.0, 0
    for batch in test_reader.epoch():
        loss, predictions = eval_step(batch.images, batch.labels)
        loss_sum += float(loss)
        n += len(batch)
        cm += confusion_matrix(batch.labels, predictions.numpy(), config.number_classes)
    s = scores(cm)
    return {"test_loss": loss_sum / max(n, 1), **_pixel_metrics(s), "scores": s}


def _pixel_metrics(s: dict) -> dict:
    return {"mean_iou": s["mean_iou"], "mean_foreground_iou": s["mean_foreground_iou"], "mean_dice": s["mean_dice"],
            "pixel_accuracy": s["pixel_accuracy"], "iou_per_class": " ".join(f"{v:.4f}" for v in s["iou"])}


def _evaluate_instances(spec, test_reader, eval_step) -> dict:
    """Instance model: per-channel test losses, then post-processing of every test tile and matching at IoU 0.5.

    Foreground metrics (the confusion matrix keys of a semantic run) compare the
    post-processed objects with the true ones as background/object.
    """
    post = postprocess_defaults(spec)
    n_channels = len(spec.channels)
    channel_sums = np.zeros(n_channels, np.float64)
    cm = np.zeros((2, 2), np.int64)
    matchings = []
    n = 0
    for batch in test_reader.epoch():
        losses, maps = eval_step(batch.images, batch.labels)
        channel_sums += losses.numpy()
        n += len(batch)
        maps = maps.numpy()
        for b in range(len(batch)):
            truth = batch.labels[b, :, :, n_channels].astype(np.int64)
            predicted = postprocess(maps[b], post)
            matchings.append(match_instances(truth, predicted, thresholds=EVAL_MATCHING_THRESHOLDS))
            cm += confusion_matrix((truth > 0).astype(np.uint8), (predicted > 0).astype(np.uint8), 2)
    s = scores(cm)
    channel_losses = channel_sums / max(n, 1)
    pooled = pool_stats(matchings)[EVAL_MATCHING_THRESHOLDS[0]]
    matching = {"f1": pooled.f1, "panoptic_quality": pooled.panoptic_quality, "precision": pooled.precision,
                "recall": pooled.recall, "objects_true": pooled.n_true, "objects_predicted": pooled.n_pred}
    s.update(matching, channel_losses={c: float(v) for c, v in zip(spec.channels, channel_losses)})
    return {"test_loss": float(channel_losses.sum()), **_pixel_metrics(s),
            "channel_losses": " ".join(f"{name}={channel_losses[planes].sum():.4f}"
                                       for name, planes in plane_groups(spec.channels)),
            **matching, "scores": s}


# Post-processing tuning


def postprocess_candidates(spec) -> list[PostProcessConfig]:
    """The defaults first, then every combination of the tuning grid for the channels predicted.

    F keeps its 0.5 (it sets what is object at all); the thresholds that decide how objects
    split (Db, C, P, T) and the smallest seed vary; for polygons (R) the NMS IoU threshold
    instead of the smallest seed, for embeddings (E) the seed score too.
    """
    base = postprocess_defaults(spec)
    tuned = [c for c in base.seed_channels if c in TUNING_SEED_THRESHOLDS]
    setting, setting_values = TUNING_METHOD_SETTINGS.get(base.method, (None, (None,)))
    sizes = (base.min_seed_size,) if base.method == "polygons" else TUNING_MIN_SEED_SIZES
    candidates = [base]
    for values in itertools.product(*(TUNING_SEED_THRESHOLDS[c] for c in tuned), sizes, setting_values):
        thresholds = dict(base.thresholds, **dict(zip(tuned, values[:-2])))
        candidate = dataclasses.replace(base, thresholds=thresholds, min_seed_size=values[-2])
        if setting is not None:
            candidate = dataclasses.replace(candidate, **{setting: values[-1]})
        if candidate not in candidates:
            candidates.append(candidate)
    return candidates


def _method_setting(config: PostProcessConfig) -> dict:
    setting = TUNING_METHOD_SETTINGS.get(config.method, (None,))[0]
    return {setting: getattr(config, setting)} if setting else {}


def tune_postprocess(out: Path, test_reader, spec, log: Callable[[str], None]) -> dict:
    """Choose the post-processing of the best model by matching F1 at IoU 0.5 on the validation tiles.

    Predicts up to ``TUNING_MAX_TILES`` tiles with ``out/model.keras``, scores every
    candidate of :func:`postprocess_candidates` (pooled over the tiles), and writes the
    winner into ``model.json`` (``instance.postprocess``) with the table of scores
    (``instance.postprocess_tuning``). A candidate must beat the defaults to replace them.
    Returns the tuning record.
    """
    start = time.perf_counter()
    model = model_folder.load_model(Path(out) / model_folder.MODEL_FILE)
    activate = instance_activations(spec.kinds)
    n_channels = len(spec.channels)
    maps, truths = [], []
    for batch in test_reader.epoch():
        if len(maps) >= TUNING_MAX_TILES:
            continue  # finish the pass: the reader's next pass starts at the beginning
        predicted = activate(model(batch.images, training=False)).numpy()
        for b in range(min(len(batch), TUNING_MAX_TILES - len(maps))):
            maps.append(predicted[b])
            truths.append(batch.labels[b, :, :, n_channels].astype(np.int64))
    scored = []
    for candidate in postprocess_candidates(spec):
        matchings = [match_instances(t, postprocess(m, candidate), thresholds=(0.5,)) for m, t in zip(maps, truths)]
        f1 = pool_stats(matchings)[0.5].f1
        scored.append((candidate, float(f1) if math.isfinite(f1) else 0.0))
    default_f1 = scored[0][1]
    best, best_f1 = max(scored, key=lambda item: item[1])
    if best_f1 <= default_f1:
        best, best_f1 = scored[0]
    record = {"tiles": len(maps), "metric": "pooled matching F1 at IoU 0.5", "default_f1": default_f1,
              "chosen_f1": best_f1, "candidates": [{"thresholds": c.thresholds, "min_seed_size": c.min_seed_size,
                                                    **_method_setting(c), "f1": f} for c, f in scored]}

    def change(meta: dict) -> None:
        meta["instance"]["postprocess"] = best.to_dict()
        meta["instance"]["postprocess_tuning"] = record

    model_folder.update_model_json(out, change)
    changed = ", ".join(f"{c} {best.thresholds[c]}" for c in best.seed_channels) + \
        f", min_seed_size {best.min_seed_size}" + "".join(f", {k} {v}" for k, v in _method_setting(best).items())
    log(f"post-processing tuned on {len(maps)} validation tiles in {time.perf_counter() - start:.1f} s: {changed} "
        f"-> F1@0.5 {best_f1:.3f} (defaults {default_f1:.3f}); written to model.json")
    return record
