"""lib/inference/report.py: previews of the float maps and a self-contained report.html, from the files on disk."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import inference
from lib.common.pictures import PREVIEW_MAX_SIDE
from lib.inference.report import REPORT_HTML, read_plane, write_report
from lib.store.images import write_image
from tests.conftest import unet_folder, write_pairs


class _Page(HTMLParser):
    """Every link and picture of a page, the rows of its sortable table, and whether its tags balance."""

    VOID = {"img", "meta", "br", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.links, self.pictures, self.rows, self.open, self.scripts = [], [], 0, [], []
        self.in_sortable = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in self.VOID:
            self.open.append(tag)
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "img":
            self.pictures.append(attrs["src"])
        if tag == "script":
            assert "src" not in attrs  # nothing loaded from elsewhere
        if tag == "link":
            raise AssertionError("no external style sheets")
        if tag == "table" and "sortable" in attrs.get("class", ""):
            self.in_sortable = True
        if tag == "tr" and self.in_sortable:
            self.rows += 1

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (self.open[-3:], tag)
        self.open.pop()
        if tag == "table":
            self.in_sortable = False


def check_page(path: Path) -> _Page:
    """Parse ``path``; every relative link exists beside it, every inlined picture decodes as a PNG."""
    from PIL import Image

    parsed = _Page()
    parsed.feed(path.read_text())
    parsed.close()
    assert parsed.open == []
    for link in parsed.links:
        assert "://" not in link and not link.startswith("/"), link
        assert (path.parent / link).is_file(), link
    for source in parsed.pictures:
        assert source.startswith("data:image/png;base64,"), source[:40]
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 1
            picture.load()
    return parsed


@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    model = unet_folder(root / "model", 3, "uint16", 30000.0, 17000.0, depth=1)
    data = write_pairs(root / "data", [(70, 90), (64, 64), (33, 80)])
    assert inference.main(["--saved_model_filepath", str(model), "--image_folder", str(data / "images"),
                           "--mask_folder", str(data / "masks"), "--output_folder", str(root / "out"),
                           "--probabilities", "--uncertainty", "--quiet"]) == 0
    return root / "out"


def test_report_of_a_semantic_run_is_self_contained_and_complete(predicted):
    path = write_report(predicted, log=lambda m: None)
    assert path == predicted / REPORT_HTML
    parsed = check_page(path)
    assert parsed.rows == 1 + 3  # header and one row per image
    for key in ("img_00", "img_01", "img_02"):
        assert f"overlays/{key}.png" in parsed.links
        assert f"previews/{key}_probabilities.png" in parsed.links and f"previews/{key}_entropy.png" in parsed.links
        assert f"previews/{key}_labels.png" in parsed.links
    text = path.read_text()
    assert "table.sortable th" in text and "mean entropy" in text and "mean IoU" in text
    # the rows come most uncertain first, as uncertainty.csv ranks them
    ranked = [line.split(",")[0] for line in (predicted / "uncertainty.csv").read_text().splitlines()[1:]]
    assert [text.index(f"<td>{key}</td>") for key in ranked] == sorted(text.index(f"<td>{key}</td>") for key in ranked)
    # preview of the foreground probability: 1 - P(background), in colour, enlarged with a colour bar
    from PIL import Image

    with Image.open(predicted / "previews" / "img_02_probabilities.png") as picture:
        assert picture.mode == "RGB" and picture.width >= 768 and picture.height > 33 * (768 // 80)
    # again: a report of its own is replaced, not refused
    assert write_report(predicted, log=lambda m: None) == path


def test_a_report_html_this_tool_did_not_write_is_left_alone(predicted, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(predicted, out)
    (out / REPORT_HTML).write_text("<html>my notes</html>")
    said = []
    assert write_report(out, log=said.append) is None
    assert (out / REPORT_HTML).read_text() == "<html>my notes</html>"
    assert "was not written by this tool" in said[0]


def test_instance_maps_from_records_get_one_preview_per_channel(tmp_path):
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    write_image(out / "cells.tif", rng.integers(0, 5, (40, 60)).astype(np.uint16))
    outputs = {"labels": "cells.tif"}
    for channel in ("foreground", "distance"):
        write_image(out / "probabilities" / f"cells_{channel}.tif", rng.random((40, 60)).astype(np.float32))
        outputs[f"probabilities_{channel}"] = f"probabilities/cells_{channel}.tif"
    (out / "records").mkdir()
    (out / "records" / "cells.json").write_text(json.dumps({"outputs": outputs}))
    (out / "records" / "half.pending.json").write_text(json.dumps({"outputs": {}}))  # unfinished: not listed
    (out / "instance_metrics.csv").write_text("image,threshold,f1,precision\ncells,0.5,0.75,0.8\n"
                                              "ALL,0.5,0.75,0.8\n")
    parsed = check_page(write_report(out, log=lambda m: None))
    assert parsed.rows == 2
    assert {"previews/cells_probabilities_foreground.png", "previews/cells_probabilities_distance.png",
            "previews/cells_labels.png"} <= set(parsed.links)
    assert len(parsed.pictures) == 1  # no overlay without a mask: the labels are the thumbnail
    from PIL import Image

    with Image.open(out / "previews" / "cells_labels.png") as picture:  # 60 px wide: 13x
        labels = np.asarray(picture.convert("RGB"))
    assert labels.shape[1] == 60 * 13 and len({tuple(c) for c in labels[:40 * 13:13, ::13].reshape(-1, 3)}) == 5
    assert "F1 at IoU 0.5" in (out / REPORT_HTML).read_text() and "half" not in (out / REPORT_HTML).read_text()


def test_big_maps_are_read_subsampled_tile_by_tile(tmp_path):
    import tifffile

    yy, xx = np.mgrid[:2100, :2300].astype(np.float32)
    values = np.stack([yy * 3 + xx, yy - 2 * xx]) % 997  # every pixel different along a row and a column
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, values, tile=(256, 256), compression="zlib", metadata={"axes": "CYX"})
    plane, axes = read_plane(path, plane=1)
    step = -(-2300 // PREVIEW_MAX_SIDE)
    assert axes == "CYX" and plane.shape == (1050, 1150)
    np.testing.assert_array_equal(plane, values[1, ::step, ::step])
