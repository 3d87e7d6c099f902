"""Fault injection for fuse_masks.py (issue 13): each row makes its bad input, runs main(argv), and checks the
exit code, the message (what, which file, how to fix) and what is left on disk."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fuse_masks
from lib.store import images


def disc(shape=(40, 48), centre=(20, 24), radius=12) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius ** 2).astype(np.uint8) * 255


def experts(root: Path, keys=("a", "b", "c"), n=3, suffix=".png") -> Path:
    """0/255 masks of ``keys`` by ``n`` experts (discs shifted by one pixel per expert)."""
    for e in range(n):
        for i, key in enumerate(keys):
            mask = disc(centre=(18 + e, 20 + 2 * i))
            path = root / f"expert{e}" / f"{key}{suffix}"
            if suffix == ".jpg":
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(path, quality=75)
            else:
                images.write_image(path, mask)
    return root


def run(source, out, *extra) -> int:
    try:
        return fuse_masks.main(["--input_folder", str(source), "--output_folder", str(out), "--quiet", *extra])
    except SystemExit as exit:  # flags checked by the parser
        return exit.code


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def no_staging(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


# Bad masks: refused by name before any work, nothing written


def _jpeg(root: Path) -> list[str]:
    experts(root, suffix=".jpg")
    return [str(root / "expert0" / "a.jpg"), "PNG or TIFF", "lossless"]


def _stray_pixel(root: Path) -> list[str]:
    experts(root)
    mask = images.read_image(root / "expert1" / "b.png")[..., 0].copy()
    mask[3, 3] = 7  # one stray value: the 255s of this mask are no longer read as 1
    images.write_image(root / "expert1" / "b.png", mask)
    return [str(root / "expert1" / "b.png"), "binary mask values must be 0 and 1", "images disagree"]


def _odd_patch_first_mask(root: Path) -> list[str]:
    experts(root)
    mask = images.read_mask(root / "expert0" / "a.png").copy()
    mask[30:34, 2:6] = 2  # one odd patch in the first expert's first mask
    images.write_image(root / "expert0" / "a.png", mask)
    return [str(root / "expert0" / "a.png"), "labels above 1: 2", "mask type: binary", "images disagree"]


def _ringing_everywhere(root: Path) -> list[str]:
    experts(root)
    rng = np.random.default_rng(0)
    for path in sorted(root.rglob("*.png")):  # as if decoded from JPEG: values 1..254 along the edges
        mask = images.read_image(path)[..., 0].astype(np.int16)
        edge = (np.abs(np.diff(mask, axis=1, prepend=0)) > 0)
        mask[edge] = rng.integers(1, 255, int(edge.sum()))
        images.write_image(path, mask.astype(np.uint8))
    return ["below 32", "classes", str(root / "expert"), "--mask_type"]


@pytest.mark.parametrize("make", [_jpeg, _stray_pixel, _odd_patch_first_mask, _ringing_everywhere],
                         ids=["JPEG masks", "0/255 with a stray 7", "odd patch in first mask", "256 values"])
def test_bad_masks_are_refused_by_name(tmp_path, capsys, make):
    source = tmp_path / "in"
    expected = make(source)
    out = tmp_path / "out"
    started = time.perf_counter()
    assert run(source, out) == 2
    assert time.perf_counter() - started < 20  # never a 256-class STAPLE
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert not out.exists() and no_staging(tmp_path)


def test_disagreeing_images_are_reported_even_quiet(tmp_path, capsys):
    source = tmp_path / "in"
    for e in range(3):  # two images of 4 classes, one where every expert drew only class 1
        for key in ("a", "b"):
            mask = np.zeros((20, 20), np.uint8)
            mask[2:8, 2:8], mask[10:16, 2:8], mask[2:8, 10 + e:16], mask[12:18, 12:18] = 1, 2, 3, 1
            images.write_image(source / f"expert{e}" / f"{key}.png", mask)
        images.write_image(source / f"expert{e}" / "c.png", (disc((20, 20), (10, 10), 5) // 255).astype(np.uint8))
    assert run(source, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "mask type: multiclass" in err and "2 multiclass (a, b)" in err and "1 binary (c)" in err
    assert json.loads((tmp_path / "out" / "fusion.json").read_text())["mask_type"] == "multiclass"


# The output folder


def test_file_not_written_by_fusion_is_never_replaced(tmp_path, capsys):
    source = experts(tmp_path / "in")
    out = tmp_path / "out"
    images.write_image(out / "b.png", np.full((4, 4), 9, np.uint8))  # the user's own mask, same name
    before = (out / "b.png").read_bytes()
    assert run(source, out) == 2
    err = capsys.readouterr().err
    assert str(out / "b.png") in err and "--overwrite" in err and "choose a new folder" in err
    assert listing(out) == ["b.png"] and (out / "b.png").read_bytes() == before and no_staging(tmp_path)
    assert run(source, out, "--overwrite") == 0
    assert images.read_mask(out / "b.png").shape == (40, 48)
    assert "b.png" in json.loads((out / "fusion.json").read_text())["written"]


def test_rerun_replaces_its_own_outputs_and_removes_stale_ones(tmp_path, capsys):
    source = experts(tmp_path / "in")
    out = tmp_path / "out"
    assert run(source, out, "--save_probabilities") == 0
    assert (out / "probabilities" / "a.tif").is_file()
    (out / "notes.txt").write_text("mine")  # not where fusion writes: kept
    assert run(source, out, "--method", "majority_vote") == 0  # other settings: no stale result stays
    assert not (out / "probabilities" / "a.tif").exists() and (out / "notes.txt").read_text() == "mine"
    written = json.loads((out / "fusion.json").read_text())["written"]
    assert sorted(written) == sorted(p for p in listing(out) if (out / p).is_file() and p != "notes.txt")


def test_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    source = experts(tmp_path / "in")
    out = tmp_path / "out"
    out.write_text("a file")
    assert run(source, out) == 2
    err = capsys.readouterr().err
    assert "--output_folder must be a folder" in err and str(out) in err
    assert out.read_text() == "a file" and no_staging(tmp_path)
