"""After a run: colour previews of the float maps and ``report.html``, built from the files on disk.

:func:`write_report` is called once at the end of :func:`lib.inference.runner.run_inference`
(and can be called on any finished output folder). It reads what the run wrote
(``inference.json``, ``records/KEY.json``, ``uncertainty.csv``, ``metrics.csv``,
``instance_metrics.csv``, ``overlays/``, the float TIFFs) and writes:

- ``previews/KEY_labels.png``: the predicted labels, one colour per class or object (the
  thumbnail of an image without a mask, so a run without masks still shows its results);
- ``previews/KEY_<map>.png``: each probability and uncertainty map of an image as a colour
  picture with a colour bar (:func:`lib.common.pictures.preview`); of an instance model only
  its binary channels (``inference.json``'s ``instance.kinds``: F, C, P, ...; not distances,
  rays or offsets). Maps are read subsampled to at most
  :data:`lib.common.pictures.PREVIEW_MAX_SIDE` on the long side: a TIFF one plane and one tile
  or strip at a time, so a 50 000 px image costs a few MB; an OME-Zarr map from the largest
  pyramid level within that size (:func:`read_zarr_plane`). Of a semantic model's (classes, H, W)
  probabilities only the background plane is read (the preview shows foreground =
  1 - background). Stacks show their middle plane.
- ``report.html``: one self-contained page (:mod:`lib.common.html_report`): the run's
  settings, the overall metrics, and one row per image (thumbnail linking to the full
  overlay, scores, uncertainty, the ``intensity_flag`` of ``uncertainty.csv`` with flagged rows
  marked, links to the previews), sortable by any column.

Every file goes through :mod:`lib.common.files` (atomic, umask mode). A ``report.html`` this
tool did not write is left alone (with a warning).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..common import html_report as page
from ..common.errors import ToolkitError
from ..common.files import write_text
from ..common.pictures import PREVIEW_MAX_SIDE, colour_labels, enlarge, preview, save_png, with_legend
from ..model_folder import probability_planes
from ..store.ome_zarr import OmeZarrImage, OmeZarrView, is_zarr_path, open_ome_zarr
from .intensity import COLUMN as INTENSITY_COLUMN

REPORT_HTML = "report.html"
PREVIEW_FOLDER = "previews"
FLAG_MARK = "&#9888;"  # a warning sign before a flagged image's name and flag
FLAG_STYLE = "color: #b00000; font-weight: bold"
MAX_THUMBNAILS = 400  # images past this many get links, no inlined thumbnail (keeps the page a few MB)
# record output name -> (preview title, colour map, low, high); high None: the map's maximum
MAPS = {"probabilities": ("foreground probability (1 - background)", "viridis", 0.0, 1.0),
        "entropy": ("uncertainty: normalised entropy", "magma", 0.0, 1.0),
        "spread": ("uncertainty: spread of the members", "magma", 0.0, None)}


# Reading a plane of a TIFF subsampled


def read_plane(path: str | Path, plane: int | None = None, max_side: int = PREVIEW_MAX_SIDE
               ) -> tuple[np.ndarray, str]:
    """One 2-D plane of a TIFF, subsampled by a whole step to at most ``max_side``: ((h, w) array of the
    file's dtype, axes).

    ``plane``: index of the plane among the TIFF's pages (a (C, H, W) file has one page per
    channel), default the middle one of a stack's first channel (0 for a 2-D map). The page is
    decoded one tile or strip at a time and only every ``step``-th row and column is kept.
    ``axes`` is the series' axes string (e.g. ``"CYX"``). Samples stored within a page
    (``S``) count as channels too: ``plane`` picks one of them.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        pages = series.pages
        if plane is None:
            extra = dict(zip(axes, shape))
            plane = (extra.get("Z", 1) // 2) * int(np.prod([n for a, n in extra.items() if a not in "ZYXS"] or [1]))
        samples = int(pages[0].keyframe.samplesperpixel)
        if len(pages) == 1 and samples > 1:  # channels stored as samples of one page
            page, sample = pages[0], min(plane, samples - 1)
        else:
            page, sample = pages[min(plane, len(pages) - 1)], 0
        key = page.keyframe  # a TiffFrame keeps its tags in its key frame
        separate = int(key.planarconfig) == 2 and samples > 1
        height, width = key.imagelength, key.imagewidth
        step = max(1, -(-max(height, width) // max_side))
        out = np.zeros((-(-height // step), -(-width // step)), key.dtype)
        for segment, index, seg_shape in page.segments():
            if segment is None or (separate and index[0] != sample):
                continue
            y0, x0 = index[2], index[3]
            data = np.asarray(segment).reshape(seg_shape)[0, ..., 0 if separate else sample]  # this tile or strip
            data = data[:max(0, height - y0), :max(0, width - x0)]
            first_y, first_x = (-y0) % step, (-x0) % step
            kept = data[first_y::step, first_x::step]
            oy, ox = (y0 + first_y) // step, (x0 + first_x) // step
            out[oy:oy + kept.shape[0], ox:ox + kept.shape[1]] = kept
    return out, axes


# Previews


def read_zarr_plane(path: str | Path, channel: int = 0, max_side: int = PREVIEW_MAX_SIDE
                    ) -> tuple[np.ndarray, int]:
    """One 2-D plane of an OME-Zarr image, at most ``max_side`` on the long side: ((h, w) array, channels).

    Reads the largest pyramid level whose long side is at most ``max_side`` (the smallest level
    when none is), subsampled by a whole step when still larger, so a large image costs only its
    small level. ``channel``: index along ``c`` (when the image has channels); a stack shows its
    middle ``z`` plane.
    """
    import zarr

    full = open_ome_zarr(path)  # checks the metadata and axes
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    attrs = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    levels = [group[str(d["path"])] for d in attrs["multiscales"][0]["datasets"]]
    y, x = full.axes.index("y"), full.axes.index("x")
    fitting = [a for a in levels if max(a.shape[y], a.shape[x]) <= max_side]
    array = fitting[0] if fitting else min(levels, key=lambda a: a.shape[y] * a.shape[x])
    sizes = dict(zip(full.axes, array.shape))
    view = OmeZarrView(OmeZarrImage(full.path, array, full.axes, full.scale, full.units),
                       plane=sizes["z"] // 2 if "z" in sizes else None)
    step = max(1, -(-max(sizes["y"], sizes["x"]) // max_side))
    block = view[::step, ::step]
    return block[..., min(channel, block.shape[-1] - 1)], int(sizes.get("c", 1))


def _is_map(path: Path) -> bool:
    """A map the previews can read: a TIFF file or an OME-Zarr folder."""
    if is_zarr_path(path):
        return path.is_dir()
    return path.is_file() and path.suffix.lower().startswith(".tif")


def _read_map(path: Path, name: str) -> tuple[np.ndarray, bool]:
    """(the plane of a map a preview shows, whether it holds several channels)."""
    if is_zarr_path(path):
        values, channels = read_zarr_plane(path)  # channel 0: the background of a semantic model
        return values, channels > 1
    values, axes = read_plane(path, plane=_background_plane(path) if name == "probabilities" else None)
    return values, "C" in axes or "S" in axes


def write_previews(out: Path, record: dict, key: str, channels: set[str] | None = None) -> dict[str, str]:
    """The preview PNGs of one image's float maps (OME-TIFF or OME-Zarr); {map name: path relative to ``out``}.

    ``channels``: the instance channels to draw (``probabilities_NAME``), None for every one.
    """
    written = {}
    labels = (record.get("outputs") or {}).get("labels")
    if labels and ((out / labels).is_file() or _is_map(out / labels)):
        target = out / PREVIEW_FOLDER / f"{key}_labels.png"
        written["labels"] = str(target.relative_to(out))
        if not target.is_file() or target.stat().st_mtime < (out / labels).stat().st_mtime:
            save_png(target, with_legend(colour_labels(_read_labels(out / labels)), [],
                                         title=f"{key}: predicted labels (one colour per class or object)"))
    for name, relative in sorted((record.get("outputs") or {}).items()):
        path = out / relative
        if not _is_map(path):
            continue
        if name.startswith("probabilities_"):  # instance models: one map per channel
            channel = name[len("probabilities_"):]
            if channels is not None and channel not in channels:
                continue  # distances, rays, offsets: not probabilities
            title, colours, low, high = f"probability of {channel}", "viridis", 0.0, 1.0
        elif name in MAPS:
            title, colours, low, high = MAPS[name]
        else:
            continue
        target = out / PREVIEW_FOLDER / f"{key}_{name}.png"
        written[name] = str(target.relative_to(out))
        if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime:
            continue  # drawn by an earlier call from the same map
        values, several = _read_map(path, name)
        values = values.astype(np.float32)
        if name == "probabilities":
            if not several:  # one channel: a binary map, P(foreground)
                title = "foreground probability"
            else:
                values = 1.0 - values
        if high is None:
            finite = values[np.isfinite(values)]
            high = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        save_png(target, preview(values, f"{key}: {title}", low, high, colours=colours))
    return written


def preview_channels(settings: dict) -> set[str] | None:
    """The instance channels worth a preview: the binary ones (probabilities, e.g. F, C, P) of
    ``inference.json``'s ``instance`` block; None (every channel) when it does not say."""
    block = settings.get("instance") or {}
    names, kinds = block.get("channels"), block.get("kinds")
    if not isinstance(names, list) or not isinstance(kinds, list) or len(names) != len(kinds):
        return None
    return {name for name, is_probability in zip(names, probability_planes(names, kinds)) if is_probability}


def _read_labels(path: Path) -> np.ndarray:
    """A label image (TIFF, PNG or OME-Zarr) subsampled to at most PREVIEW_MAX_SIDE; a stack's middle plane."""
    if is_zarr_path(path):
        return read_zarr_plane(path)[0]
    if path.suffix.lower().startswith(".tif"):
        return read_plane(path)[0]
    from PIL import Image

    with Image.open(path) as picture:
        values = np.asarray(picture)
    values = values[..., 0] if values.ndim == 3 else values
    step = max(1, -(-max(values.shape) // PREVIEW_MAX_SIDE))
    return values[::step, ::step]


def _background_plane(path: Path) -> int:
    """The page index of class 0 (of the middle plane of a stack) in a (Z,) C, H, W probability TIFF."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        extra = dict(zip(tif.series[0].axes, tif.series[0].shape))
    return (extra.get("Z", 1) // 2) * extra.get("C", 1)


# The page


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def read_records(out: Path) -> dict[str, dict]:
    """{key: record} of every finished image (``records/KEY.json``, pending ones left out)."""
    records = {}
    for path in sorted((out / "records").glob("*.json")):
        if path.name.endswith(".pending.json"):
            continue
        try:
            records[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return records


def _thumbnail(out: Path, relative: str | None) -> str | None:
    """A data URI of the picture ``out/relative`` (a PNG overlay or preview), or None."""
    if not relative or not (out / relative).is_file():
        return None
    from PIL import Image

    try:
        with Image.open(out / relative) as picture:
            picture.draft("RGB", (page.THUMBNAIL_SIDE, page.THUMBNAIL_SIDE))
            picture.thumbnail((page.THUMBNAIL_SIDE, page.THUMBNAIL_SIDE))
            return page.png_data_uri(enlarge(np.asarray(picture.convert("RGB")), page.THUMBNAIL_SIDE // 2))
    except OSError:
        return None


def build_html(out: Path, records: dict[str, dict], previews: dict[str, dict[str, str]]) -> str:
    """The text of ``report.html`` of the output folder ``out``."""
    settings = json.loads((out / "inference.json").read_text()) if (out / "inference.json").is_file() else {}
    config = settings.get("config", {})
    uncertainty = {r["image"]: r for r in _rows(out / "uncertainty.csv")}
    metrics = {r["image"]: r for r in _rows(out / "metrics.csv")}
    instance = {}
    for row in _rows(out / "instance_metrics.csv"):
        if abs(_float(row.get("threshold")) - 0.5) < 1e-9:
            instance[row["image"]] = row
    parts = ['<p class="note">Written by inference.py from the files of this folder. Click a column header to '
             'sort; click a thumbnail for the full overlay.</p>', "<h2>Run</h2>"]
    facts = [("model", settings.get("compared", {}).get("model", config.get("model"))),
             ("images", config.get("image_folder")), ("masks", config.get("mask_folder")),
             ("kind", settings.get("label_kind")), ("classes", settings.get("number_classes")),
             ("test-time augmentation", config.get("tta")), ("precision", settings.get("precision")),
             ("halo (px)", settings.get("compared", {}).get("halo")), ("images predicted", len(records))]
    parts.append(page.table(["setting", "value"], [[page.escape(k), page.escape(v)] for k, v in facts
                                                   if v is not None]))
    overall = [(name, table_row) for name, table_row in (("pixels (metrics.csv)", metrics.get("ALL")),
                                                         ("objects at IoU 0.5 (instance_metrics.csv)",
                                                          instance.get("ALL"))) if table_row]
    if overall:
        parts.append("<h2>All images together</h2>")
        for name, row in overall:
            shown = [(k, v) for k, v in row.items() if k not in ("image", "threshold")]
            parts.append(f"<p>{page.escape(name)}</p>" + page.table(
                [k for k, _ in shown], [[page.escape(page.number(_float(v)) if v else "") for _, v in shown]],
                numeric=[True] * len(shown)))
    score_name, score_of = ("F1 at IoU 0.5", lambda key: instance.get(key, {}).get("f1")) if instance else \
        ("mean IoU", lambda key: metrics.get(key, {}).get("mean_iou"))
    header = ["image", "picture", score_name, "mean entropy", "uncertain fraction", "mean spread",
              "intensity flag", "files"]
    body, flagged = [], 0
    ranked = sorted(records, key=lambda k: -_float(uncertainty.get(k, {}).get("mean_entropy")))
    for number, key in enumerate(ranked):
        record, scores = records[key], uncertainty.get(key, {})
        outputs = record.get("outputs") or {}
        shown = outputs.get("overlay") or previews.get(key, {}).get("labels") or \
            next(iter(previews.get(key, {}).values()), None)
        uri = _thumbnail(out, shown) if number < MAX_THUMBNAILS else None
        links = [(name, rel) for name, rel in outputs.items() if name != "record"]
        links += [(f"{name} preview", rel) for name, rel in previews.get(key, {}).items()]
        links = [(name, rel) for name, rel in links if (out / rel).exists()]
        flag = (scores.get(INTENSITY_COLUMN) or "").strip()
        flagged += bool(flag)
        body.append([
            f'{FLAG_MARK} {page.escape(key)}' if flag else page.escape(key),
            page.image(uri, f"{key}", link=shown) if uri else (f'<a href="{page.escape(shown)}">open</a>' if shown
                                                               else ""),
            page.escape(page.number(_float(score_of(key)))),
            page.escape(page.number(_float(scores.get("mean_entropy")))),
            page.escape(page.number(_float(scores.get("uncertain_fraction")))),
            page.escape(page.number(_float(scores.get("mean_spread")))),
            f'<span style="{FLAG_STYLE}">{FLAG_MARK} {page.escape(flag)}</span>' if flag else "",
            " ".join(f'<a href="{page.escape(rel)}">{page.escape(name)}</a>' for name, rel in links)])
    parts.append(f"<h2>Images ({len(records)}), most uncertain first</h2>")
    if len(records) > MAX_THUMBNAILS:
        parts.append(f'<p class="note">Thumbnails for the {MAX_THUMBNAILS} most uncertain images; the others '
                     "have links.</p>")
    if flagged:
        parts.append(f'<p><span style="{FLAG_STYLE}">{FLAG_MARK} {flagged} image(s)</span> have an intensity unlike '
                     f"the training images' ({INTENSITY_COLUMN} of uncertainty.csv: saturated, flat, contrast, "
                     "histogram_shape...): check their predictions first.</p>")
    parts.append(page.table(header, body, sortable=True,
                            numeric=[False, False, True, True, True, True, False, False]))
    return page.page(f"Inference report: {out.name}", "\n".join(parts))


def write_report(output_folder: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """Write the previews of every finished image and ``report.html`` into ``output_folder``; return its path.

    Returns None (with a warning through ``log``) when ``report.html`` exists and is not this
    tool's. Images whose maps cannot be read get no preview (a warning each), not an error.
    """
    out = Path(output_folder)
    target = out / REPORT_HTML
    if not page.may_write(target, log):
        return None
    records = read_records(out)
    try:
        settings = json.loads((out / "inference.json").read_text()) if (out / "inference.json").is_file() else {}
    except (OSError, ValueError):
        settings = {}
    channels = preview_channels(settings if isinstance(settings, dict) else {})
    previews = {}
    for key, record in records.items():
        try:
            previews[key] = write_previews(out, record, key, channels)
        except (OSError, ValueError, IndexError, KeyError, ToolkitError) as exc:
            log(f"warning: {key}: no preview of its maps ({exc})")
    write_text(target, build_html(out, records, previews))
    return target
