"""Fusing a folder of experts' masks: planning, running image by image, outputs and summary.

``input_folder/<expert>/<key>.<ext>`` holds one sub-folder per expert; masks of one image
share a file key. :func:`plan_fusion` matches them by key and checks every file header
before anything is read in full; :func:`fuse_folder` fuses image by image
(:func:`lib.fusion.masks.fuse_masks`: STAPLE in :mod:`.staple`, majority voting in
:mod:`.vote`) into a hidden staging folder and moves the outputs into place only when
every image is done. ``fuse_masks.py`` is its command line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..common import files
from ..common.errors import OutputError
from ..common.files import folder_mode, write_json, write_text, write_with
from ..common.pictures import preview, save_png
from ..common.settings import ConfigError
from ..store import images
from .masks import IOU_THRESHOLD, MASK_TYPES, METHODS, check_values, decide_mask_type, fuse_masks
from .patterns import FusionError, FusionResult, iteration_problems
from .staple import DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("png", "tif")
PER_IMAGE_CSV = "fusion_per_image.csv"
SUMMARY_CSV = "fusion_summary.csv"
SETTINGS_JSON = "fusion.json"
PROBABILITY_FOLDER = "probabilities"
AGREEMENT_FOLDER = "agreement"
PREVIEW_FOLDER = "previews"  # colour-mapped PNGs with a colour bar, for people (the maps above are data)
LOSSY = (".jpg", ".jpeg")  # refused as masks: their codec changes label values
METRIC_ORDER = ("dice", "f1_iou50", "sensitivity", "specificity")
ROW_HEAD = ("image", "expert", "mask_file", "n_experts")
ROW_TAIL = ("iterations", "converged")


class MaskLayoutError(FusionError):
    """Every problem of an experts' folder (missing masks, unreadable files, shapes), reported at once."""

    def __init__(self, problems: list[str], title: str):
        self.problems = list(problems)
        lines = [f"{title} ({len(self.problems)}); nothing was written:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """How to fuse: every setting of :func:`fuse_folder`, validated at construction.

    ``method``: one of :data:`lib.fusion.masks.METHODS`. ``mask_type``: ``"auto"`` (decided
    from every image, :func:`lib.fusion.masks.decide_mask_type`) or one of
    :data:`lib.fusion.masks.MASK_TYPES`. ``undecided_label``: label of pixels without a unique
    winner (0..65535). ``max_iterations`` / ``tolerance``: STAPLE's stopping rule
    (``tolerance`` None: SimpleITK's default for the mask type). ``save_probabilities``: also
    write ``probabilities/<key>.tif``. ``output_format``: ``"png"``, ``"tif"`` or None (the
    format of the input masks). ``overwrite``: replace files of the output folder that this
    tool did not write (its ``fusion.json`` does not list them). Raises ``ConfigError`` listing
    every invalid field.
    """

    method: str = "staple"
    mask_type: str = "auto"
    undecided_label: int = 0
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    tolerance: float | None = None
    save_probabilities: bool = False
    output_format: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.mask_type != "auto" and self.mask_type not in MASK_TYPES:
            problems.append(f"mask_type must be auto or one of {', '.join(MASK_TYPES)}; got {self.mask_type!r}")
        label = self.undecided_label
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label <= 65535:
            problems.append(f"undecided_label must be in 0..65535 (an integer); got {label!r}")
        problems += iteration_problems(self.max_iterations, self.tolerance)
        if self.output_format is not None and self.output_format not in OUTPUT_FORMATS:
            problems.append(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {self.output_format!r}")
        if problems:
            raise ConfigError(problems)

    def resolved_tolerance(self, mask_type: str) -> float:
        """The tolerance STAPLE uses for ``mask_type``: the one given, else SimpleITK's default."""
        return self.tolerance or DEFAULT_TOLERANCE["multiclass" if mask_type == "multiclass" else "binary"]


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """The masks of one image: expert name -> file, the experts without one, the output name."""

    key: str
    files: dict[str, Path]
    missing: list[str]
    output_name: str


@dataclasses.dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse_folder` did: settings, per-image rows, per-expert summary, output paths."""

    mask_type: str
    mask_type_reason: str
    experts: list[str]
    n_images: int
    rows: list[dict]
    summary: list[dict]
    output_folder: Path
    seconds: float


# Planning


def output_folder_problem(input_folder: str | os.PathLike, output_folder: str | os.PathLike) -> str | None:
    """A message when the output folder would mix with the inputs (symbolic links resolved) or is a file, else None."""
    if Path(output_folder).exists() and not Path(output_folder).is_dir():
        return (f"output_folder must be a folder (created when missing); got the file {str(output_folder)!r}. "
                "Choose a new folder")
    if files.is_inside(output_folder, input_folder):
        return (f"output_folder must not be inside input_folder; got {str(output_folder)!r} in {str(input_folder)!r}. "
                "Every sub-folder of the input folder is read as an expert; write elsewhere")
    if files.is_inside(input_folder, output_folder):
        return (f"output_folder must not contain input_folder; got {str(output_folder)!r}, which holds "
                f"{str(input_folder)!r}. Outputs could replace files beside your experts' masks; write elsewhere")
    return None


def find_experts(input_folder: str | os.PathLike) -> dict[str, Path]:
    """Expert name -> folder: the visible sub-folders of ``input_folder``, sorted by name.

    Raises ``FusionError`` (bad input, exit 2) when the folder does not exist.
    """
    folder = Path(input_folder)
    if not folder.is_dir():
        raise FusionError(f"input_folder must be an existing folder; got {str(folder)!r}")
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def plan_fusion(input_folder: str | os.PathLike, output_format: str | None = None) -> tuple[list[ImageJob], list[str]]:
    """Match masks across experts by file key and check the layout from file headers.

    Returns ``(jobs, problems)``. Problems: fewer than two expert folders, an expert folder
    without masks, duplicate keys, an image with fewer than two masks, unreadable or
    non-2D masks, masks of one image with different shapes (both paths and shapes).
    Experts missing for an image are not problems; they are listed in ``ImageJob.missing``.
    Raises ``ConfigError`` for an unknown ``output_format``.
    """
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise ConfigError([f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}"])
    folder = Path(input_folder)
    experts = find_experts(folder)
    problems: list[str] = []
    if len(experts) < 2:
        loose = len(images.list_images(folder)[0])
        hint = f" (it holds {loose} image file(s) directly: pass the parent of the experts' folders)" if loose else ""
        problems.append(f"input_folder must hold one sub-folder per expert, at least two; got {len(experts)} "
                        f"({', '.join(experts) or 'none'}) in {folder}{hint}")
        return [], problems
    files: dict[str, dict[str, Path]] = {}
    for name, expert_folder in experts.items():
        found, duplicates = images.list_images(expert_folder)
        problems += duplicates
        if not found:
            problems.append(f"expert folder must hold mask files ({', '.join(images.IMAGE_EXTENSIONS)}); got none in "
                            f"{expert_folder}. Remove the folder or add that expert's masks")
        files[name] = found
    lossy = sorted(str(p) for found in files.values() for p in found.values() if p.suffix.lower() in LOSSY)
    if lossy:
        problems.append(f"masks must be saved in a lossless format (PNG or TIFF); got {len(lossy)} JPEG file(s): "
                        + ", ".join(lossy[:10]) + (f" and {len(lossy) - 10} more" if len(lossy) > 10 else "")
                        + ". JPEG turns 0/255 masks into values 1..254 along edges: save the masks as PNG or TIFF")
    jobs = []
    for key in sorted(set().union(*(f.keys() for f in files.values()))):
        present = {name: files[name][key] for name in experts if key in files[name]}
        missing = [name for name in experts if key not in files[name]]
        if len(present) < 2:
            (name, path), = present.items()
            problems.append(f"image {key!r} must have masks from at least two experts; got only {name} ({path})")
            continue
        problems += _check_headers(key, present)
        jobs.append(ImageJob(key, present, missing, key + _output_suffix(next(iter(present.values())), output_format)))
    return jobs, problems


def _output_suffix(first: Path, output_format: str | None) -> str:
    if output_format is not None:
        return ".png" if output_format == "png" else ".tif"
    if first.suffix.lower() in (".jpg", ".jpeg"):
        return ".png"  # never write labels with a lossy codec
    return first.suffix


def _check_headers(key: str, present: dict[str, Path]) -> list[str]:
    problems, shapes = [], {}
    for name, path in present.items():
        try:
            info = images.read_info(path)
        except images.ImageReadError as exc:
            problems.append(f"unreadable mask: {exc}")
            continue
        if info.is_volume:
            problems.append(f"mask must be 2D; got a stack of shape (Z, Y, X, C) = {info.shape} in {path}")
        elif info.shape[2] not in (1, 2, 3, 4):
            problems.append(f"mask must have one channel; got {info.shape[2]} in {path}")
        else:
            shapes[name] = info.shape[:2]
    if shapes:
        reference = next(iter(shapes))
        for name, shape in shapes.items():
            if shape != shapes[reference]:
                problems.append(f"masks of image {key!r} must all have the same shape; got {shapes[reference][0]}x"
                                f"{shapes[reference][1]} (HxW) in {present[reference]} and {shape[0]}x{shape[1]} in "
                                f"{present[name]}")
    return problems


def _warn_missing(jobs: list[ImageJob], experts: list[str]) -> None:
    for expert in experts:
        lacking = [job.key for job in jobs if expert in job.missing]
        if lacking:
            shown = ", ".join(lacking[:10]) + (f" and {len(lacking) - 10} more" if len(lacking) > 10 else "")
            logger.warning("expert %s has no mask for %d image(s): %s; those are fused from the other experts",
                           expert, len(lacking), shown)


def _read_masks(paths: Sequence[Path]) -> list[np.ndarray]:
    try:
        return [images.read_mask(p) for p in paths]
    except images.ImageReadError as exc:
        raise FusionError(f"unreadable mask: {exc}") from exc


# Running


def fuse_folder(input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                config: FusionConfig = FusionConfig(), command: Sequence[str] | None = None) -> FusionReport:
    """Fuse every image's expert masks in ``input_folder/<expert>/<key>.<ext>`` into ``output_folder``.

    Writes ``<key>.<ext>`` fused masks (binary as 0/255 uint8, multi-class labels, instance
    ids), ``agreement/<key>.png`` (uint8 count of experts: binary and instance, how many
    marked the pixel as foreground; multi-class, how many gave the fused label),
    ``previews/<key>_agreement.png`` (the same counts in colours with a legend, for people),
    ``probabilities/<key>.tif`` (float32, when ``config.save_probabilities``, with
    ``previews/<key>_probabilities.png``, colour-mapped 0..1 with a colour bar),
    ``fusion_per_image.csv`` (one row per image and expert), ``fusion_summary.csv`` (per
    expert: mean and std over images) and ``fusion.json`` (settings and provenance). Every
    file goes through :mod:`lib.common.files` (atomic, mode from the umask).

    Outputs go to a hidden staging folder beside ``output_folder`` and move into place only
    when every image is fused, so a failed run leaves nothing behind.
    Raises ``MaskLayoutError`` listing every layout problem (JPEG masks included) before anything
    is written, ``FusionError`` when mask values do not fit the mask type or an automatic
    multi-class decision finds more than ``MAX_AUTO_CLASSES`` classes, ``ConfigError`` for an
    output folder inside the input folder or that is a file (all three bad input, exit 2, and
    ``ValueError``), ``OutputError`` (exit 2, before any work) when the output folder holds files
    this tool did not write where it would write, unless ``config.overwrite``. ``fusion.json``
    lists every file written (``written``); files of an earlier fusion there that this one does
    not write are removed, so no stale result stays beside new ones.
    """
    started = time.perf_counter()
    problem = output_folder_problem(input_folder, output_folder)
    if problem:
        raise ConfigError([problem])
    output_folder = Path(output_folder)
    jobs, problems = plan_fusion(input_folder, config.output_format)
    if problems:
        raise MaskLayoutError(problems, title=f"The expert masks in {input_folder} have problems")
    experts = list(find_experts(input_folder))
    _warn_missing(jobs, experts)

    planned = [name for job in jobs for name in _image_outputs(job, config)] + [PER_IMAGE_CSV, SUMMARY_CSV,
                                                                                 SETTINGS_JSON]
    if not config.overwrite:
        check_foreign(output_folder, planned)
    mask_type, how, reason, first_masks = config.mask_type, "as given", "set by the caller", None
    if mask_type == "auto":
        first_masks = _read_masks(list(jobs[0].files.values()))
        mask_type, reason, plain = decide_mask_type(
            (job.key, list(job.files.values()), first_masks if i == 0 else _read_masks(list(job.files.values())))
            for i, job in enumerate(jobs))
        how = "detected from every image"
        (logger.info if plain else logger.warning)("mask type: %s (%s: %s); pass --mask_type to override",
                                                   mask_type, how, reason)

    output_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_folder.name}.partial-", dir=output_folder.parent))
    os.chmod(staging, folder_mode())  # mkdtemp makes it 0700; it becomes the output folder
    try:
        rows = []
        for index, job in enumerate(jobs):
            masks = first_masks if index == 0 and first_masks is not None else None
            rows += _fuse_one(staging, job, (mask_type, how), config, masks)
        summary = summarize(rows, experts)
        _write_tables(staging, rows, summary)
        settings = {"command": list(command) if command is not None else None,
                    "input_folder": str(Path(input_folder).resolve()), "experts": experts, "method": config.method,
                    "mask_type": mask_type, "mask_type_reason": f"{how}: {reason}",
                    "undecided_label": config.undecided_label, "max_iterations": config.max_iterations,
                    "tolerance": config.resolved_tolerance(mask_type), "save_probabilities": config.save_probabilities,
                    "iou_threshold": IOU_THRESHOLD, "python": sys.version.split()[0], "numpy": np.__version__,
                    "images": [{"key": j.key, "experts": list(j.files), "missing": j.missing,
                                "output": j.output_name} for j in jobs]}
        settings["written"] = sorted([str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()]
                                     + [SETTINGS_JSON])
        write_json(staging / SETTINGS_JSON, settings)
        _commit(staging, output_folder, config.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FusionReport(mask_type, f"{how}: {reason}", experts, len(jobs), rows, summary, output_folder,
                        time.perf_counter() - started)


def _fuse_one(staging: Path, job: ImageJob, mask_type: tuple[str, str], config: FusionConfig,
              masks: list[np.ndarray] | None) -> list[dict]:
    """Fuse one image into ``staging``; its rows of the per-image table. ``mask_type``: (type, how decided)."""
    tic = time.perf_counter()
    kind, how = mask_type
    paths = list(job.files.values())
    masks = _read_masks(paths) if masks is None else masks
    check_values(masks, paths, kind, how)
    fused, result, metrics = fuse_masks(masks, kind, config.method, config.undecided_label, config.max_iterations,
                                        config.tolerance, config.save_probabilities)
    _write_image_outputs(staging, job, kind, fused, result)
    rows = [{"image": job.key, "expert": expert, "mask_file": str(path), "n_experts": len(paths), **metric,
             "iterations": result.iterations, "converged": result.converged}
            for expert, path, metric in zip(job.files, paths, metrics)]
    logger.info("%s: %d experts%s, %s%s, %.2f s", job.key, len(paths),
                f" (missing {', '.join(job.missing)})" if job.missing else "", config.method,
                f" {result.iterations} iterations" if config.method == "staple" else "", time.perf_counter() - tic)
    return rows


def _write_image(path: Path, array: np.ndarray) -> None:
    # images.write_image renames its own temporary onto the path it is given; writing onto a
    # temporary of lib.common.files gives the output the umask's mode and an fsync.
    write_with(path, lambda tmp: images.write_image(tmp, array))


def _write_image_outputs(staging: Path, job: ImageJob, mask_type: str, fused: np.ndarray,
                         result: FusionResult) -> None:
    mask = fused
    if mask_type == "binary":
        mask = fused.astype(np.uint8, copy=True)
        mask[fused == 1] = 255  # viewable; read_mask turns 0/255 back into 0/1
    name = job.output_name
    if mask.dtype.itemsize > 2 and not name.lower().endswith((".tif", ".tiff")):
        logger.warning("%s: %s needs %s labels, which PNG cannot hold; writing %s.tif", job.key, name, mask.dtype,
                       job.key)
        name = job.key + ".tif"
    _write_image(staging / name, mask)
    _write_image(staging / AGREEMENT_FOLDER / f"{job.key}.png", result.agreement)
    experts = len(job.files)
    what = "gave the fused label" if mask_type == "multiclass" else "marked foreground"
    save_png(staging / PREVIEW_FOLDER / f"{job.key}_agreement.png",
             preview(result.agreement, f"{job.key}: how many of the {experts} experts {what}",
                     levels=[f"{k} of {experts}" for k in range(experts + 1)]))
    if result.probabilities is not None:
        _write_image(staging / PROBABILITY_FOLDER / f"{job.key}.tif", result.probabilities)
        probabilities = result.probabilities
        if probabilities.ndim == 3:  # (H, W, C): the probability of the fused label
            title, probabilities = "probability of the fused label", probabilities.max(axis=2)
        else:
            title = "probability of foreground"
        save_png(staging / PREVIEW_FOLDER / f"{job.key}_probabilities.png",
                 preview(probabilities, f"{job.key}: {title}", 0.0, 1.0))


def _image_outputs(job: ImageJob, config: FusionConfig) -> list[str]:
    """The files one image gets (relative to the output folder); a PNG name may also become ``KEY.tif``."""
    names = [job.output_name, f"{AGREEMENT_FOLDER}/{job.key}.png", f"{PREVIEW_FOLDER}/{job.key}_agreement.png"]
    if not job.output_name.lower().endswith((".tif", ".tiff")):
        names.append(f"{job.key}.tif")  # labels above uint16 (see _write_image_outputs)
    if config.save_probabilities:
        names += [f"{PROBABILITY_FOLDER}/{job.key}.tif", f"{PREVIEW_FOLDER}/{job.key}_probabilities.png"]
    return names


def owned_outputs(output_folder: Path) -> set[str]:
    """The files (relative paths) of ``output_folder`` that its ``fusion.json`` lists as this tool's."""
    try:
        settings = json.loads((output_folder / SETTINGS_JSON).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(settings, dict):
        return set()
    if isinstance(settings.get("written"), list):
        return {str(name) for name in settings["written"]}
    owned = {PER_IMAGE_CSV, SUMMARY_CSV, SETTINGS_JSON}  # a fusion.json written before the list was kept
    for image in settings.get("images", []) if isinstance(settings.get("images"), list) else []:
        if isinstance(image, dict) and "key" in image:
            owned |= {str(image.get("output")), f"{AGREEMENT_FOLDER}/{image['key']}.png",
                      f"{PROBABILITY_FOLDER}/{image['key']}.tif"}
    return owned


def check_foreign(output_folder: Path, names: Sequence[str]) -> None:
    """Raise ``OutputError`` naming the files of ``names`` that exist in ``output_folder`` and are not this tool's."""
    if not output_folder.is_dir():
        return
    owned = owned_outputs(output_folder)
    foreign = [str(output_folder / n) for n in dict.fromkeys(names) if n not in owned and (output_folder / n).exists()]
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise OutputError(f"output_folder must not hold files this tool did not write where it writes; got "
                          f"{len(foreign)} such file(s): {shown}. Pass --overwrite to replace them, or choose a "
                          "new folder")


def _commit(staging: Path, output_folder: Path, overwrite: bool = False) -> None:
    """Move the staged outputs into ``output_folder`` (one rename when it does not exist yet).

    Checked again first (nothing moved when a target is not this tool's, unless ``overwrite``);
    files an earlier fusion wrote there that this one did not are removed (stale results).
    """
    if not output_folder.exists():
        os.replace(staging, output_folder)
        return
    written = [str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()]
    owned = owned_outputs(output_folder)
    if not overwrite:
        check_foreign(output_folder, written)
    for stale in sorted(owned - set(written)):
        target = output_folder / stale
        if files.is_inside(target, output_folder) and target.is_file() and not target.is_symlink():
            target.unlink()
    for source in sorted(staging.rglob("*")):
        if source.is_file():
            target = output_folder / source.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    shutil.rmtree(staging, ignore_errors=True)


# Tables


def _metric_columns(rows: list[dict]) -> list[str]:
    """The metric names found in ``rows``, in reading order (dice, dice per class, f1, ...)."""
    keys = {k for row in rows for k in row if k not in ROW_HEAD + ROW_TAIL}

    def order(key: str) -> tuple:
        head = next((i for i, m in enumerate(METRIC_ORDER) if key == m or key.startswith(m + "_class_")),
                    len(METRIC_ORDER))
        return head, int(key.rsplit("_", 1)[1]) if "_class_" in key else -1, key

    return sorted(keys, key=order)


def summarize(rows: list[dict], experts: Sequence[str]) -> list[dict]:
    """Per expert: number of images and mean / std (over images, ignoring NaN) of every metric."""
    columns = _metric_columns(rows)
    summary = []
    for expert in experts:
        mine = [row for row in rows if row["expert"] == expert]
        entry: dict = {"expert": expert, "n_images": len(mine)}
        for column in columns:
            values = np.array([row.get(column, np.nan) for row in mine], dtype=np.float64)
            finite = values[np.isfinite(values)]
            entry[f"{column}_mean"] = float(finite.mean()) if finite.size else float("nan")
            entry[f"{column}_std"] = float(finite.std()) if finite.size else float("nan")
        summary.append(entry)
    return summary


def _write_tables(staging: Path, rows: list[dict], summary: list[dict]) -> None:
    metrics = _metric_columns(rows)
    _write_csv(staging / PER_IMAGE_CSV, rows, ROW_HEAD + tuple(metrics) + ROW_TAIL)
    _write_csv(staging / SUMMARY_CSV, summary,
               ("expert", "n_images") + tuple(f"{m}_{s}" for m in metrics for s in ("mean", "std")))


def _format(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else format(value, ".6g")
    return str(value)


def _write_csv(path: Path, rows: list[dict], fields: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows([[_format(row.get(f, float("nan"))) for f in fields] for row in rows])
    write_text(path, buffer.getvalue())
