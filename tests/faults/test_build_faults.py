"""Fault injection for build_lmdb.py and the database store: each bad input made here, the CLI run,
its exit code, its message (what, which file, how to fix) and what is left on disk asserted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import build_lmdb
from lib.store.images import ImageReadError, read_image, write_image
from lib.store.lmdb_store import LmdbReader
from tests.conftest import ROOT


def _dataset(root: Path, n: int = 3, mask=None, image=None) -> Path:
    """``n`` pairs img_i.png (uint8 32x32) / img_i.png (0/255 binary masks, or ``mask(i)``)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        write_image(root / "images" / f"img_{i}.png",
                    image(i) if image else rng.integers(0, 256, (32, 32), dtype=np.uint8))
        m = mask(i) if mask else (rng.integers(0, 2, (32, 32)) * 255).astype(np.uint8)
        write_image(root / "masks" / f"img_{i}.png", m)
    return root


def _build(root: Path, *extra: str, images: str = "images", masks: str = "masks", out: str = "out") -> int:
    argv = ["--image_folder", str(root / images), "--mask_folder", str(root / masks),
            "--output_folder", str(root / out), "--dataset_name", "t", "--tile_size", "16", "--workers", "0",
            "--quiet", *extra]
    try:
        return build_lmdb.main(argv)
    except SystemExit as exit_:  # flag misuse exits through argparse
        return int(exit_.code)


def _nothing_written(root: Path) -> None:
    out = root / "out"
    assert not out.exists() or not [p for p in out.iterdir() if p.name != "keep.txt"], "nothing may be written"


def _blobs(i: int) -> np.ndarray:
    """Twelve separate 4x4 squares with ids 1..12: an instance mask."""
    mask = np.zeros((32, 32), np.uint8)
    for k in range(12):
        y, x = 8 * (k // 4), 8 * (k % 4)
        mask[y + 1:y + 5, x + 1:x + 5] = k + 1
    return mask


def _stray_7(i: int) -> np.ndarray:
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    if i == 1:
        mask[0, 0] = 7
    return mask


def _ringing(i: int) -> np.ndarray:
    """A 0/255 mask after a JPEG round trip (then saved as PNG): ringing values along its edges."""
    import io

    from PIL import Image

    mask = np.zeros((32, 32), np.uint8)
    mask[4 + i:20 + i, 6:26] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="JPEG", quality=75)
    return np.array(Image.open(buffer))


def _jpeg_mask(root: Path) -> None:
    (root / "masks" / "img_1.png").unlink()
    from PIL import Image

    Image.fromarray(_stray_7(0)).save(root / "masks" / "img_1.jpg", quality=75)


def _jpeg_tiff_mask(root: Path) -> None:
    import tifffile

    (root / "masks" / "img_2.png").unlink()
    tifffile.imwrite(root / "masks" / "img_2.tif", _stray_7(0), compression="jpeg")


def _truncated(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _truncated_tiff(root: Path, which: str, keep: int) -> None:
    folder = root / which
    (folder / "img_1.png").unlink()
    write_image(folder / "img_1.tif", _stray_7(0) // 255 if which == "masks" else np.ones((32, 32), np.uint8))
    _truncated(folder / "img_1.tif", keep)


def _nan_image(root: Path, which: int = 2) -> None:
    for i in range(3):
        (root / "images" / f"img_{i}.png").unlink()
        image = np.ones((32, 32), np.float32)
        if i == which:
            image[3, 4], image[5, 6] = np.nan, np.inf
        write_image(root / "images" / f"img_{i}.tif", image)


# (id, make the fault, extra flags, messages that must all appear)
REFUSED = [
    ("jpeg_mask", lambda r: _jpeg_mask(_dataset(r)), [], ["lossless format", "JPEG", "img_1.jpg", "PNG or TIFF"]),
    ("jpeg_compressed_tiff_mask", lambda r: _jpeg_tiff_mask(_dataset(r)), [], ["lossless format", "img_2.tif", "PNG or TIFF"]),
    ("stray_pixel_in_0_255_mask", lambda r: _dataset(r, mask=_stray_7), [],
     ["stray pixel", "7 (1 px)", "img_1.png", "set them to 0 or 255"]),
    ("ringing_values_saved_as_png", lambda r: _dataset(r, mask=_ringing), [],
     ["number of classes must be plausible", "got 256", "img_1.png (16, 17", "--mask_type instance",
      "--number_classes 256"]),
    ("object_ids_as_semantic", lambda r: _dataset(r, mask=_blobs), [],
     ["like object ids", "img_0.png (12 values)", "--mask_type instance"]),
    ("nan_and_inf_in_float_image", lambda r: _nan_image(_dataset(r)), [], ["must be finite", "1 NaN and 1 infinite", "img_2.tif"]),
    ("truncated_tiff_image_header", lambda r: _truncated_tiff(_dataset(r), "images", 8), [],
     ["cannot read", "img_1.tif", "truncated or damaged", "export it again"]),
    ("truncated_tiff_image_pixels", lambda r: _truncated_tiff(_dataset(r), "images", 300), [],
     ["cannot read", "img_1.tif", "truncated or damaged"]),
    ("truncated_tiff_mask", lambda r: _truncated_tiff(_dataset(r), "masks", 20), [],
     ["unreadable mask", "img_1.tif", "truncated or damaged"]),
    ("same_folder_empty_suffix", lambda r: _same_folder(r), ["--mask_suffix", ""],
     ["mask_suffix must tell masks from images", "their own folder"]),
]


def _same_folder(root: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(3):
        write_image(root / "both" / f"img_{i}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
        write_image(root / "both" / f"img_{i}_mask.png", (rng.integers(0, 2, (32, 32)) * 255).astype(np.uint8))


@pytest.mark.parametrize("name, make, extra, messages", REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_input_is_refused_naming_the_file_and_nothing_is_written(tmp_path, capsys, name, make, extra, messages):
    root = tmp_path
    make(root)
    folders = {"images": "both", "masks": "both"} if name.startswith("same_folder") else {}
    assert _build(root, *extra, **folders) == 2
    captured = capsys.readouterr()
    for message in messages:
        assert message in captured.err, f"{message!r} not in {captured.err}"
    assert "Traceback" not in captured.err and "invalid offset" not in captured.err + captured.out
    _nothing_written(root)


def test_all_plausibility_problems_come_in_one_report(tmp_path, capsys):
    _dataset(tmp_path, mask=_stray_7)
    _jpeg_tiff_mask(tmp_path)
    _nan_image(tmp_path, which=0)
    assert _build(tmp_path) == 2
    err = capsys.readouterr().err
    assert "problems (3)" in err
    assert "lossless" in err and "masks/img_2.tif" in err
    assert "stray pixel" in err and "masks/img_1.png" in err
    assert "must be finite" in err and "images/img_0.tif" in err
    _nothing_written(tmp_path)


ACCEPTED = [
    ("binary_0_255", None, [], 2),
    ("multi_class_0_to_3", lambda i: np.random.default_rng(i).integers(0, 4, (32, 32)).astype(np.uint8), [], 4),
    ("object_ids_as_instance", _blobs, ["--mask_type", "instance"], 2),
    ("ringing_kept_when_classes_are_stated", _ringing, ["--number_classes", "256"], 256),
]


@pytest.mark.parametrize("name, mask, extra, classes", ACCEPTED, ids=[r[0] for r in ACCEPTED])
def test_legitimate_masks_still_build(tmp_path, name, mask, extra, classes):
    _dataset(tmp_path, mask=mask)
    assert _build(tmp_path, *extra) == 0
    with LmdbReader(tmp_path / "out" / "train-t.lmdb") as reader:
        assert reader.metadata["number_classes"] == classes
        top = max(int(reader[i][1].max()) for i in range(len(reader)))
        assert top == 12 if "instance" in extra else top < classes  # instance ids are kept


def test_same_image_and_mask_folder_pairs_by_suffix_and_never_uses_masks_as_images(tmp_path):
    _same_folder(tmp_path)
    assert _build(tmp_path, "--train_fraction", "1", images="both", masks="both") == 0
    with LmdbReader(tmp_path / "out" / "train-t.lmdb") as reader:
        sources = reader.metadata["sources"]
    assert sorted(s["key"] for s in sources) == ["img_0", "img_1", "img_2"]
    assert all(s["mask"].endswith(f"{s['key']}_mask.png") and s["image"].endswith(f"{s['key']}.png")
               for s in sources)
    assert reader.metadata["number_classes"] == 2


@pytest.mark.parametrize("where", ["file", "image_folder", "mask_folder", "inside_image_folder"])
def test_bad_output_folder_exits_2_before_any_work(tmp_path, capsys, where):
    _dataset(tmp_path)
    out = {"file": "out", "image_folder": "images", "mask_folder": "masks", "inside_image_folder": "images/db",
           "parent_of_inputs": "."}[where]
    if where == "file":
        (tmp_path / "out").write_text("mine")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert _build(tmp_path, out=out) == 2
    err = capsys.readouterr().err
    assert "--output_folder must" in err and "Traceback" not in err
    assert ("is a file" in err) if where == "file" else ("choose a new folder" in err)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    if where == "file":
        assert (tmp_path / "out").read_text() == "mine"


def test_a_parent_of_the_input_folders_is_a_fine_output_folder(tmp_path):
    _dataset(tmp_path)  # images/ and masks/ in tmp_path; the databases go beside them
    inputs = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert _build(tmp_path, out=".") == 0
    assert (tmp_path / "train-t.lmdb").is_dir()
    assert set(inputs) <= {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}


def _damage(database: Path, how: str) -> None:
    data = database / "data.mdb"
    size = data.stat().st_size
    if how == "random_bytes":
        data.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    elif how == "truncated_half":
        os.truncate(data, size // 2)
    elif how == "truncated_empty":
        os.truncate(data, 0)
    elif how == "zeroed_meta_pages":
        raw = bytearray(data.read_bytes())
        raw[:8192] = bytes(8192)
        data.write_bytes(bytes(raw))
    elif how == "random_pages_after_meta":
        raw = bytearray(data.read_bytes())
        raw[16384:] = np.random.default_rng(1).integers(0, 256, size - 16384, dtype=np.uint8).tobytes()
        data.write_bytes(bytes(raw))
    elif how == "no_metadata_record":
        import lmdb

        with lmdb.open(str(database), subdir=True) as env, env.begin(write=True) as txn:
            txn.delete(b"__metadata__")


@pytest.mark.parametrize("how", ["random_bytes", "truncated_half", "truncated_empty", "zeroed_meta_pages",
                                 "random_pages_after_meta", "no_metadata_record"])
def test_damaged_database_is_one_clear_error_naming_the_file(tmp_path, how):
    _dataset(tmp_path, n=4)
    assert _build(tmp_path) == 0
    database = tmp_path / "out" / "train-t.lmdb"
    _damage(database, how)
    # In a child process: a truncated memory map would kill this one with SIGBUS if it were read.
    code = ("import sys\nfrom lib.store.lmdb_store import LmdbReader, StoreError\n"
            "try:\n    r = LmdbReader(sys.argv[1])\n    [r[i] for i in range(len(r))]\n"
            "except StoreError as e:\n    print(e); sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(database)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert str(database) in proc.stdout and "ebuild" in proc.stdout and proc.stderr == ""
    if how != "no_metadata_record":
        assert "data.mdb is damaged" in proc.stdout and "build_lmdb.py" in proc.stdout


def test_database_without_its_lock_file_still_reads(tmp_path):
    _dataset(tmp_path, n=4)
    assert _build(tmp_path) == 0
    database = tmp_path / "out" / "train-t.lmdb"
    (database / "lock.mdb").unlink()
    with LmdbReader(database) as reader:
        assert len(reader) > 0 and reader[0][0].shape == (16, 16, 1)


def test_truncated_tiff_is_an_image_read_error_for_a_single_read(tmp_path, capfd):
    _truncated_tiff(_dataset(tmp_path), "images", 8)
    with pytest.raises(ImageReadError, match="img_1.tif: the file is truncated or damaged"):
        read_image(tmp_path / "images" / "img_1.tif")
    assert "invalid offset" not in "".join(capfd.readouterr())


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_a_parallel_build_leaves_no_worker_alive(tmp_path):
    _dataset(tmp_path, n=8)
    # Workers only for builds of 32 MB and more: lower the bar, and slow each job down so that the
    # build is surely running when it is killed.
    script = ("import sys, time\nimport lib.store.build as b\nb.SMALL_BUILD_BYTES = 0\nslow_of = b._process\n"
              "def slow(job):\n    time.sleep(0.5)\n    return slow_of(job)\nb._process = slow\n"
              "import build_lmdb\nsys.exit(build_lmdb.main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", script, "--image_folder", str(tmp_path / "images"),
                             "--mask_folder", str(tmp_path / "masks"), "--output_folder", str(out),
                             "--dataset_name", "t", "--tile_size", "16", "--workers", "2", "--quiet"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, []
    while time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if len(workers) >= 2 and any(out.glob(".building-*/train-t.lmdb/data.mdb")):
            break
        time.sleep(0.02)
    assert proc.poll() is None and len(workers) >= 2, "the build must be running with its 2 workers"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:  # do not leave them to the next test
        os.kill(w, signal.SIGKILL)
    assert survivors == [], "workers must end with the build that started them"
    assert not (out / "train-t.lmdb").exists()
    # The next build removes the temporary folder the killed one left and succeeds.
    assert _build(tmp_path) == 0
    assert sorted(p.name for p in out.iterdir()) == ["split-t.csv", "test-t.lmdb", "train-t.lmdb"]
