"""report.html of OME-Zarr runs, of instance models with non-probability channels, and the intensity flag column."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import inference  # noqa: E402
from lib.inference.report import REPORT_HTML, read_zarr_plane, write_report  # noqa: E402
from lib.store.images import write_image  # noqa: E402
from lib.store.ome_zarr import write_ome_zarr  # noqa: E402
from tests.conftest import unet_folder, write_pairs  # noqa: E402
from tests.inference.test_report_html import check_page  # noqa: E402

zarr = pytest.importorskip("zarr")


def test_an_ome_zarr_run_gets_the_previews_and_pictures(tmp_path):
    pytest.importorskip("keras")
    model = unet_folder(tmp_path / "model", 3, "uint16", 30000.0, 17000.0, depth=1)
    data = write_pairs(tmp_path / "data", [(70, 90), (40, 48)])
    out = tmp_path / "out"
    assert inference.main(["--model", str(model), "--image_folder", str(data / "images"), "--output_folder",
                           str(out), "--probabilities", "--uncertainty", "--output_format", "ome-zarr",
                           "--quiet"]) == 0
    assert (out / "img_00.ome.zarr").is_dir()
    for key in ("img_00", "img_01"):
        for name in ("labels", "probabilities", "entropy"):
            assert (out / "previews" / f"{key}_{name}.png").is_file(), (key, name)
    text = (out / REPORT_HTML).read_text()
    assert text.count("<img ") == 2  # one thumbnail per image (no masks: the labels preview)
    assert 'href="previews/img_00_probabilities.png"' in text and 'href="img_00.ome.zarr"' in text
    from PIL import Image

    # the foreground preview of a 3-class model is 1 - P(background): it matches the stored maps
    with Image.open(out / "previews" / "img_01_labels.png") as picture:
        assert picture.mode == "RGB" and picture.width >= 48
    background, channels = read_zarr_plane(out / "probabilities" / "img_01.ome.zarr")
    stored = np.asarray(zarr.open_group(str(out / "probabilities" / "img_01.ome.zarr"), mode="r")["0"][...])
    assert channels == 3 and np.array_equal(background, stored[0])


def test_a_large_ome_zarr_map_is_read_from_a_small_level(tmp_path):
    values = (np.arange(2600 * 40, dtype=np.float32).reshape(2600, 40) % 251) / 251
    path = write_ome_zarr(tmp_path / "big.ome.zarr", values, labels=False)
    group = zarr.open_group(str(path), mode="r")
    assert group["0"].shape == (2600, 40) and group["1"].shape == (1300, 20)
    plane, channels = read_zarr_plane(path)
    assert channels == 1 and plane.shape == (1300, 20)
    np.testing.assert_array_equal(plane, group["1"][...])
    small, _ = read_zarr_plane(path, max_side=500)  # levels of 650 then 325 rows: 325, no subsampling
    np.testing.assert_array_equal(small, group["3"][...])
    labels = np.arange(3 * 30 * 20).reshape(3, 30, 20).astype(np.uint16)
    stack = write_ome_zarr(tmp_path / "stack.ome.zarr", labels, labels=True, volume=True)
    np.testing.assert_array_equal(read_zarr_plane(stack)[0], labels[1])  # a stack shows its middle plane


def _instance_folder(out: Path, channels: list[str], kinds: list[str]) -> None:
    """The files a run of an instance model leaves (maps faked): inference.json, labels, a map per channel."""
    rng = np.random.default_rng(3)
    write_image(out / "cells.tif", rng.integers(0, 4, (30, 40)).astype(np.uint16))
    outputs = {"labels": "cells.tif"}
    for name in channels:
        write_image(out / "probabilities" / f"cells_{name}.tif", rng.random((30, 40)).astype(np.float32))
        outputs[f"probabilities_{name}"] = f"probabilities/cells_{name}.tif"
    (out / "records").mkdir()
    (out / "records" / "cells.json").write_text(json.dumps({"outputs": outputs}))
    (out / "inference.json").write_text(json.dumps({"label_kind": "instance", "instance": {
        "channels": channels, "kinds": kinds}}))


@pytest.mark.parametrize("channels, kinds, drawn", [
    (["F"] + [f"R{k}" for k in range(32)], ["binary"] + ["ray"] * 32, {"F"}),
    (["F", "H", "V"], ["binary", "distance", "distance"], {"F"}),
    (["F", "C", "Db"], ["binary", "binary", "distance"], {"F", "C"}),
])
def test_only_probability_channels_get_a_preview(tmp_path, channels, kinds, drawn):
    out = tmp_path / "out"
    _instance_folder(out, channels, kinds)
    parsed = check_page(write_report(out, log=lambda m: None))
    previews = {p.name for p in (out / "previews").iterdir()}
    assert previews == {"cells_labels.png"} | {f"cells_probabilities_{name}.png" for name in drawn}
    assert {f"previews/cells_probabilities_{name}.png" for name in drawn} <= set(parsed.links)
    assert {f"probabilities/cells_{name}.tif" for name in channels} <= set(parsed.links)  # every map stays linked


def test_the_intensity_flag_is_shown_and_flagged_rows_are_marked(tmp_path):
    out = tmp_path / "out"
    (out / "records").mkdir(parents=True)
    for key in ("dim", "fine"):
        (out / "records" / f"{key}.json").write_text(json.dumps({"outputs": {}}))
    (out / "uncertainty.csv").write_text("image,mean_entropy,uncertain_fraction,intensity_flag\n"
                                         "dim,0.4,0.2,saturated+flat\nfine,0.1,0.0,\n")
    parsed = check_page(write_report(out, log=lambda m: None))
    assert parsed.rows == 3
    text = (out / REPORT_HTML).read_text()
    assert "<th>intensity flag</th>" in text
    assert '<td>&#9888; dim</td>' in text and "<td>fine</td>" in text  # the flagged row is marked, the other not
    assert '<span style="color: #b00000; font-weight: bold">&#9888; saturated+flat</span>' in text
    assert "1 image(s)</span> have an intensity unlike the training images" in text
    clean = tmp_path / "clean"
    (clean / "records").mkdir(parents=True)
    (clean / "records" / "fine.json").write_text(json.dumps({"outputs": {}}))
    (clean / "uncertainty.csv").write_text("image,mean_entropy,intensity_flag\nfine,0.1,\n")
    text = write_report(clean, log=lambda m: None).read_text()
    assert "&#9888;" not in text and "<th>intensity flag</th>" in text
