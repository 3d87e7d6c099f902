"""fuse_masks.py previews: agreement counts and probabilities as colour pictures with a legend / colour bar."""

from __future__ import annotations

import json

import numpy as np

import fuse_masks
from lib.common import pictures
from lib.fusion.runner import FusionConfig, fuse_folder
from lib.store import images


def _experts(root, shape=(64, 64)):
    """Three experts over one image 'cells': column band k is marked by exactly k experts."""
    marks = np.zeros((3,) + shape, np.uint8)
    for count in range(1, 4):
        band = slice(16 * count, 16 * count + 16)
        marks[:count, :, band] = 255
    for e in range(3):
        images.write_image(root / f"expert{e + 1}" / "cells.png", marks[e])
    return root


def _rgb(path):
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_agreement_and_probability_previews_are_coloured_and_readable(tmp_path):
    source, out = _experts(tmp_path / "in"), tmp_path / "out"
    fuse_folder(source, out, FusionConfig(save_probabilities=True))
    counts = images.read_mask(out / "agreement" / "cells.png", binary_255=False)  # the data stays counts 0..3
    assert sorted(np.unique(counts)) == [0, 1, 2, 3]
    picture = _rgb(out / "previews" / "cells_agreement.png")
    # enlarged (64 px -> 12x = 768 px) above a legend strip
    assert picture.shape[1] == 768 and picture.shape[0] > 768
    factor = 768 // 64
    shown = [tuple(picture[32 * factor, (16 * k + 8) * factor]) for k in range(4)]
    assert len(set(shown)) == 4  # one colour per count
    assert all(max(colour) >= 60 for colour in shown)  # none of them near-black (the old PNG showed 0..3 of 255)
    # the legend names every count with its colour
    legend = picture[768:]
    for colour in shown:
        assert (legend == colour).all(axis=2).sum() >= 100
    probability = _rgb(out / "previews" / "cells_probabilities.png")
    assert probability.shape[1] == 768 and len({tuple(probability[32 * factor, (16 * k + 8) * factor])
                                                for k in range(4)}) >= 2  # STAPLE: nearly 0 or 1
    written = json.loads((out / "fusion.json").read_text())["written"]
    assert {"previews/cells_agreement.png", "previews/cells_probabilities.png"} <= set(written)
    # a rerun of the CLI into its own folder is allowed (the previews are listed as this tool's); without
    # probabilities their preview goes with them
    assert fuse_masks.main(["--input_folder", str(source), "--output_folder", str(out), "--quiet"]) == 0
    assert (out / "previews" / "cells_agreement.png").is_file()
    assert not (out / "previews" / "cells_probabilities.png").exists()


def test_preview_of_a_continuous_map_has_a_colour_bar_from_low_to_high():
    values = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (256, 1))
    values[0, 0] = np.nan
    picture = pictures.preview(values, "ramp", 0.0, 1.0, colours="magma")
    assert picture.shape[1] == 768 and picture.dtype == np.uint8
    ends = pictures.colour_map(np.array([[0.0, 1.0]]), 0.0, 1.0, "magma")[0]
    assert tuple(picture[400, 0]) == tuple(ends[0]) and tuple(picture[400, 767]) == tuple(ends[1])
    assert tuple(picture[0, 0]) == (128, 128, 128)  # NaN grey
    bar = picture[768:]
    assert (bar == ends[0]).all(axis=2).any() and (bar == ends[1]).all(axis=2).any()
