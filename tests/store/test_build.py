"""build_lmdb.py and lib.store.build: round trip, coverage, split, validation report, atomicity."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import build_lmdb
from lib.common.errors import BadInput, OutputError
from lib.common.settings import ConfigError
from lib.store.build import BuildConfig, OutputExistsError, _split, build_databases
from lib.store.images import DatasetError, read_image, read_mask, write_image
from lib.store.lmdb_store import LmdbReader
from tests.conftest import ROOT, SHARED_DATA, write_pairs


def _config(folder: Path, **kw) -> BuildConfig:
    values = dict(image_folder=str(folder / "images"), mask_folder=str(folder / "masks"),
                  output_folder=str(folder / "out"), dataset_name="t", workers=0)
    values.update(kw)
    return BuildConfig(**values)


def _check_databases(result, tile_size: int | None) -> dict[str, set[str]]:
    """Every pixel of every tile equals its source, and the tiles cover every source pixel."""
    keys = {}
    for split, path in result.databases.items():
        with LmdbReader(path) as reader:
            meta = reader.metadata
            assert meta["split"] == split and meta["n_records"] == len(reader)
            coverage: dict[str, np.ndarray] = {}
            sources: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for i in range(len(reader)):
                image, label = reader[i]
                info = reader.tile_info(i)
                if info["key"] not in sources:
                    sources[info["key"]] = (read_image(info["image"]), read_mask(info["mask"]))
                    coverage[info["key"]] = np.zeros(sources[info["key"]][1].shape, bool)
                src_image, src_mask = sources[info["key"]]
                y, x, vh, vw = info["y"], info["x"], info["valid_h"], info["valid_w"]
                if tile_size is not None:
                    assert image.shape[:2] == (tile_size, tile_size)
                np.testing.assert_array_equal(image[:vh, :vw], src_image[y:y + vh, x:x + vw])
                np.testing.assert_array_equal(label[:vh, :vw], src_mask[y:y + vh, x:x + vw])
                assert not label[vh:].any() and not label[:, vw:].any(), "mask padding must be background"
                coverage[info["key"]][y:y + vh, x:x + vw] = True
                for c in range(meta["number_classes"]):
                    assert (i in meta["class_tiles"][c]) == bool((label[:vh, :vw] == c).any())
            assert all(c.all() for c in coverage.values()), "tiles must cover every pixel"
            keys[split] = set(sources)
    return keys


@given(shapes=st.lists(st.tuples(st.integers(5, 70), st.integers(5, 70)), min_size=2, max_size=4),
       channels=st.sampled_from([0, 1, 2, 3]), dtype=st.sampled_from(["uint8", "uint16", "int32", "float32"]),
       tile=st.integers(8, 40), data=st.data())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_round_trip_every_pixel(tmp_path_factory, shapes, channels, dtype, tile, data):
    stride = data.draw(st.integers(max(1, tile // 3), tile))
    folder = tmp_path_factory.mktemp("rt")
    full = [s if channels == 0 else (*s, channels) for s in shapes]
    write_pairs(folder, full, dtype=dtype, n_classes=3)
    result = build_databases(_config(folder, tile_size=tile, stride=stride, train_fraction=0.5), progress=False,
                             log=lambda m: None)
    keys = _check_databases(result, tile)
    assert set().union(*keys.values()) == {f"img_{i:02d}" for i in range(len(shapes))}


def test_whole_images_without_tiling(small_dataset):
    result = build_databases(_config(small_dataset, use_tiling=False), progress=False, log=lambda m: None)
    _check_databases(result, None)
    assert sum(result.n_records.values()) == 6


def test_split_is_seeded_disjoint_and_folds_cover_training_images():
    keys = [f"k{i}" for i in range(10)]
    a, fa = _split(keys, 0.7, seed=3, folds=3)
    b, fb = _split(keys, 0.7, seed=3, folds=3)
    c, _ = _split(keys, 0.7, seed=4, folds=3)
    assert a == b and fa == fb and a != c
    assert sum(v == "train" for v in a.values()) == 7
    train = [k for k in keys if a[k] == "train"]
    assert {fa[k] for k in train} == {0, 1, 2} and all(fa[k] == -1 for k in keys if a[k] == "test")
    counts = np.bincount([fa[k] for k in train])
    assert counts.max() - counts.min() <= 1
    # n_splits = min(number of images, K)
    _, few = _split(keys[:3], 1.0, seed=0, folds=5)
    assert sorted(few.values()) == [0, 1, 2]
    # A fraction below 1 always leaves a test image, and at least one training image.
    s, _ = _split(keys[:2], 0.99, seed=0, folds=0)
    assert sorted(s.values()) == ["test", "train"]


def test_build_metadata_split_csv_and_reproducibility(small_dataset):
    config = _config(small_dataset, tile_size=32, train_fraction=0.5, folds=2, number_classes=3, seed=7)
    first = build_databases(config, command="cmd line", progress=False, log=lambda m: None)
    keys = _check_databases(first, 32)
    assert keys["train"].isdisjoint(keys["test"])
    with LmdbReader(first.databases["train"]) as reader:
        meta = reader.metadata
    assert meta["build_command"] == "cmd line" and meta["folds"] == 2 and meta["number_classes"] == 3
    assert meta["label_kind"] == "semantic" and meta["label_dtype"] == "uint8" and meta["channels"] == 1
    assert {s["split"] for s in meta["sources"]} == {"train", "test"}
    assert {s["fold"] for s in meta["sources"] if s["split"] == "train"} == {0, 1}
    # Mean and std are those of the training images' pixels.
    pixels = np.concatenate([read_image(s["image"]).ravel() for s in meta["sources"] if s["split"] == "train"])
    assert meta["channel_mean"][0] == pytest.approx(pixels.mean(), rel=1e-9)
    assert meta["channel_std"][0] == pytest.approx(pixels.std(), rel=1e-9)
    masks = np.concatenate([read_mask(s["mask"]).ravel() for s in meta["sources"] if s["split"] == "train"])
    assert meta["class_pixel_counts"] == np.bincount(masks, minlength=3).tolist()
    rows = list(csv.DictReader(open(first.split_csv)))
    assert sorted(r["key"] for r in rows) == [f"img_{i:02d}" for i in range(6)]
    assert {r["key"] for r in rows if r["split"] == "test"} == keys["test"]
    second = build_databases(_config(small_dataset, tile_size=32, train_fraction=0.5, folds=2, number_classes=3,
                                     seed=7, output_folder=str(small_dataset / "again")),
                             progress=False, log=lambda m: None)
    assert _check_databases(second, 32) == keys


def test_parallel_build_equals_in_process_build(small_dataset):
    serial = build_databases(_config(small_dataset, tile_size=24, stride=16), progress=False, log=lambda m: None)
    parallel = build_databases(_config(small_dataset, tile_size=24, stride=16, workers=2,
                                       output_folder=str(small_dataset / "par")), progress=False, log=lambda m: None)
    for split in serial.databases:
        with LmdbReader(serial.databases[split]) as a, LmdbReader(parallel.databases[split]) as b:
            assert len(a) == len(b)
            assert all(bytes(a.raw(i)) == bytes(b.raw(i)) for i in range(len(a)))
            ma, mb = dict(a.metadata), dict(b.metadata)
            for m in (ma, mb):
                m.pop("created"), m.pop("build_config")
            assert ma == mb


def test_instance_masks_keep_their_ids(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(tmp_path / "images" / f"a{i}.tif", rng.integers(0, 255, (40, 40), dtype=np.uint8))
        labels = np.zeros((40, 40), np.uint16)
        labels[5:15, 5:15] = 300 + i  # ids above 255 must survive
        labels[20:30, 20:35] = 7
        write_image(tmp_path / "masks" / f"a{i}.tif", labels)
    result = build_databases(_config(tmp_path, mask_type="instance", tile_size=40, train_fraction=1.0),
                             progress=False, log=lambda m: None)
    assert list(result.databases) == ["train"]
    with LmdbReader(result.databases["train"]) as reader:
        assert reader.metadata["label_dtype"] == "uint16" and reader.metadata["number_classes"] == 2
        values = set()
        for i in range(len(reader)):
            values |= set(np.unique(reader[i][1]).tolist())
    assert values == {0, 7, 300, 301, 302}


def test_small_images_are_padded_and_the_valid_region_recorded(tmp_path):
    write_pairs(tmp_path, [(20, 30), (64, 64)])
    messages = []
    result = build_databases(_config(tmp_path, tile_size=48, train_fraction=1.0), progress=False,
                             log=messages.append)
    assert any("smaller than tile_size 48" in m and "img_00" in m for m in messages)
    with LmdbReader(result.databases["train"]) as reader:
        tiles = reader.metadata["tiles"]
        small = [i for i in range(len(reader)) if tiles["source"][i] == 0]
        assert len(small) == 1 and (tiles["valid_h"][small[0]], tiles["valid_w"][small[0]]) == (20, 30)
    _check_databases(result, 48)


# Validation: each problem named in one report, nothing written.


def _bad(kind: str, folder: Path) -> str:
    """Make ``folder`` hold a dataset with one kind of problem; return text the report must contain."""
    write_pairs(folder, [(32, 32)] * 3)
    images, masks = folder / "images", folder / "masks"
    if kind == "missing_mask":
        (masks / "img_01.png").unlink()
        return "img_01.tif"
    if kind == "orphan_mask":
        write_image(masks / "img_99.png", np.zeros((32, 32), np.uint8))
        return "img_99.png"
    if kind == "size_mismatch":
        write_image(masks / "img_02.png", np.zeros((32, 30), np.uint8))
        return "32x30"
    if kind == "channels":
        write_image(images / "img_00.tif", np.zeros((32, 32, 3), np.uint16))
        return "channel count must be the same"
    if kind == "dtype":
        write_image(images / "img_00.tif", np.zeros((32, 32), np.float64))
        return "got float64 in"
    if kind == "negative":
        write_image(masks / "img_00.tif", np.full((32, 32), -1, np.int32))
        (masks / "img_00.png").unlink()
        return "must be >= 0"
    if kind == "non_integer":
        write_image(masks / "img_00.tif", np.full((32, 32), 0.5, np.float32))
        (masks / "img_00.png").unlink()
        return "must be integers"
    if kind == "classes":
        write_image(masks / "img_01.png", np.full((32, 32), 5, np.uint8))
        return "number_classes=3; got 5"
    if kind == "truncated":
        data = (images / "img_02.tif").read_bytes()
        (images / "img_02.tif").write_bytes(data[: len(data) // 2])
        return "img_02.tif"
    if kind == "garbage_mask":
        (masks / "img_00.png").write_bytes(b"\x89PNG garbage")
        return "img_00.png"
    raise ValueError(kind)


KINDS = ["missing_mask", "orphan_mask", "size_mismatch", "channels", "dtype", "negative", "non_integer", "classes",
         "truncated", "garbage_mask"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_problem_is_reported_with_the_file_and_nothing_is_written(tmp_path, kind):
    expected = _bad(kind, tmp_path)
    with pytest.raises(DatasetError) as info:
        build_databases(_config(tmp_path, number_classes=3, tile_size=16), progress=False, log=lambda m: None)
    assert expected in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_all_problems_come_in_one_report(tmp_path, capsys):
    expected = [_bad(k, tmp_path / k) for k in ("missing_mask", "size_mismatch", "classes")]
    # Merge three broken datasets into one folder pair with distinct names.
    for k in ("missing_mask", "size_mismatch", "classes"):
        for sub in ("images", "masks"):
            for f in (tmp_path / k / sub).iterdir():
                (tmp_path / "all" / sub).mkdir(parents=True, exist_ok=True)
                f.rename(tmp_path / "all" / sub / f"{k}_{f.name}")
    code = build_lmdb.main(["--image_folder", str(tmp_path / "all/images"), "--mask_folder",
                            str(tmp_path / "all/masks"), "--output_folder", str(tmp_path / "out"),
                            "--dataset_name", "x", "--number_classes", "3", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected), (expected, err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_report_lists_every_problem(tmp_path, capsys):
    write_pairs(tmp_path, [(32, 32)] * 4)
    (tmp_path / "masks" / "img_01.png").unlink()
    write_image(tmp_path / "masks" / "img_02.png", np.zeros((32, 31), np.uint8))
    write_image(tmp_path / "masks" / "img_03.png", np.full((32, 32), 9, np.uint8))
    code = build_lmdb.main(["--image_folder", str(tmp_path / "images"), "--mask_folder", str(tmp_path / "masks"),
                            "--output_folder", str(tmp_path / "out"), "--dataset_name", "x",
                            "--number_classes", "3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "img_01.tif" in err and "32x31" in err and "got 9" in err and "(3)" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("kw, message", [
    (dict(tile_size=0), "tile_size must be a positive"),
    (dict(stride=300), "stride must be in"),
    (dict(train_fraction=0.0), "train_fraction must be in"),
    (dict(number_classes=1), "number_classes must be >= 2"),
    (dict(folds=1), "folds must be 0"),
    (dict(mask_type="blobs"), "mask_type must be"),
    (dict(dataset_name="a/b"), "dataset_name must be"),
    (dict(workers=-1), "workers must be >= 0"),
    (dict(image_folder="/nonexistent"), "image_folder must be an existing folder"),
])
def test_config_violations(small_dataset, kw, message):
    with pytest.raises(ConfigError, match=message):
        _config(small_dataset, **kw).validate()


def test_config_collects_all_violations_and_rejects_unknown_keys(small_dataset):
    with pytest.raises(ConfigError) as info:
        _config(small_dataset, tile_size=0, folds=1, train_fraction=2.0).validate()
    assert len(info.value.violations) == 3
    with pytest.raises(ConfigError, match="unknown setting 'tilesize'"):
        BuildConfig.from_dict({**_config(small_dataset).to_dict(), "tilesize": 3})


@pytest.mark.parametrize("flag, value", [("--tile_size", "0"), ("--stride", "0"), ("--train_fraction", "1.5"),
                                         ("--folds", "1"), ("--number_classes", "1"), ("--use_tiling", "maybe")])
def test_cli_flag_misuse_exits_2(small_dataset, flag, value):
    with pytest.raises(SystemExit) as info:
        build_lmdb.parse_args(["--image_folder", "a", "--mask_folder", "b", "--output_folder", "c",
                               "--dataset_name", "d", flag, value])
    assert info.value.code == 2


def test_existing_database_is_kept_without_overwrite(small_dataset):
    config = _config(small_dataset, tile_size=32, seed=1)
    first = build_databases(config, progress=False, log=lambda m: None)
    before = (first.databases["train"] / "data.mdb").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_databases(config, progress=False, log=lambda m: None)
    assert (first.databases["train"] / "data.mdb").stat().st_mtime_ns == before
    again = build_databases(_config(small_dataset, tile_size=16, seed=1, overwrite=True), progress=False,
                            log=lambda m: None)
    with LmdbReader(again.databases["train"]) as reader:
        assert reader.metadata["tile_size"] == 16
    assert [p.name for p in (small_dataset / "out").iterdir() if p.name.startswith(".")] == []


def _big_dataset(folder: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60000, (1024, 1024), dtype=np.uint16)
    mask = rng.integers(0, 2, (1024, 1024), dtype=np.uint8)
    for i in range(40):
        write_image(folder / "images" / f"b{i:02d}.tif", image)
        write_image(folder / "masks" / f"b{i:02d}.png", mask)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_build_leaves_no_database(tmp_path, sig):
    _big_dataset(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "build_lmdb.py"), "--image_folder", str(tmp_path / "images"),
                             "--mask_folder", str(tmp_path / "masks"), "--output_folder", str(out),
                             "--dataset_name", "big", "--tile_size", "64", "--workers", "1", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(out.glob(".building-*/train-big.lmdb/data.mdb")):
        time.sleep(0.005)
    time.sleep(0.2)  # let it write some records
    assert proc.poll() is None, "the build finished before it could be interrupted; make the dataset bigger"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert not (out / "train-big.lmdb").exists() and not (out / "test-big.lmdb").exists()
    assert not (out / "split-big.csv").exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 3  # stopped early: rerun the same command
        assert list(out.iterdir()) == [], "a terminated build cleans up its temporary folder"
    # The next build removes what a killed one left and succeeds.
    code = build_lmdb.main(["--image_folder", str(tmp_path / "images"), "--mask_folder", str(tmp_path / "masks"),
                            "--output_folder", str(out), "--dataset_name", "big", "--tile_size", "512", "--quiet"])
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["split-big.csv", "test-big.lmdb", "train-big.lmdb"]


@pytest.mark.parametrize("script", ["build_lmdb.py", "train_unet.py", "train_fcn.py", "inference.py", "fuse_masks.py"])
def test_help_answers_without_tensorflow(script):
    if not (ROOT / script).exists():
        pytest.skip(f"{script} not present")
    code = ("import sys, runpy; sys.argv = [%r, '--help']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n") % (script, str(ROOT / script))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_build_does_not_import_tensorflow(small_dataset):
    code = ("import sys, build_lmdb\n"
            "assert build_lmdb.main(sys.argv[1:]) == 0\n"
            "assert 'tensorflow' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code, "--image_folder", str(small_dataset / "images"),
                             "--mask_folder", str(small_dataset / "masks"), "--output_folder",
                             str(small_dataset / "o"), "--dataset_name", "n", "--quiet"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared NIST data not beside the checkout")
def test_shared_nist_data_builds_and_reads_back_exactly(tmp_path):
    code = build_lmdb.main(["--image_folder", str(SHARED_DATA / "images"), "--mask_folder", str(SHARED_DATA / "masks"),
                            "--output_folder", str(tmp_path), "--dataset_name", "nist", "--train_fraction", "0.8",
                            "--quiet"])
    assert code == 0
    with LmdbReader(tmp_path / "train-nist.lmdb") as train, LmdbReader(tmp_path / "test-nist.lmdb") as test:
        assert (len(train), len(test)) == (48, 12)
        assert train.metadata["number_classes"] == 2
        for reader in (train, test):
            for i in range(len(reader)):
                info = reader.tile_info(i)
                np.testing.assert_array_equal(reader[i][0], read_image(info["image"]))
                np.testing.assert_array_equal(reader[i][1], read_mask(info["mask"]))


# Redesign: errors by class, one place for the rules, modes from the umask.


def _cli_args(folder: Path, *extra: str) -> list[str]:
    return ["--image_folder", str(folder / "images"), "--mask_folder", str(folder / "masks"),
            "--output_folder", str(folder / "out"), "--dataset_name", "x", "--quiet", *extra]


def test_build_outputs_are_readable_as_the_umask_says(small_dataset, monkeypatch):
    previous = os.umask(0o022)
    try:
        result = build_databases(_config(small_dataset, tile_size=32, train_fraction=0.5), progress=False,
                                 log=lambda m: None)
    finally:
        os.umask(previous)
    assert result.split_csv.stat().st_mode & 0o777 == 0o644
    for database in result.databases.values():
        assert database.stat().st_mode & 0o777 == 0o755
        for name in ("data.mdb", "lock.mdb"):
            assert (database / name).stat().st_mode & 0o777 == 0o644, (database, name)


def test_existing_output_is_bad_input_and_the_cli_exits_2_keeping_it(small_dataset, capsys):
    assert issubclass(OutputExistsError, OutputError) and issubclass(OutputExistsError, FileExistsError)
    assert build_lmdb.main(_cli_args(small_dataset, "--workers", "0")) == 0
    csv_path = small_dataset / "out" / "split-x.csv"
    before = csv_path.read_bytes(), csv_path.stat().st_mtime_ns
    capsys.readouterr()
    assert build_lmdb.main(_cli_args(small_dataset, "--workers", "0", "--tile_size", "16")) == 2
    err = capsys.readouterr().err
    assert "output must not exist" in err and "--overwrite" in err
    assert (csv_path.read_bytes(), csv_path.stat().st_mtime_ns) == before


@pytest.mark.parametrize("flags, messages", [
    (["--tile_size", "0"], ["--tile_size must be a positive number of pixels; got 0"]),
    (["--stride", "300"], ["--stride must be in [1, tile_size=256]"]),
    (["--train_fraction", "1.5"], ["--train_fraction must be in (0, 1]; got 1.5"]),
    (["--number_classes", "1"], ["--number_classes must be >= 2"]),
    (["--folds", "1"], ["--folds must be 0"]),
    (["--workers", "-1"], ["--workers must be >= 0"]),
    (["--dataset_name", ".hidden"], ["--dataset_name must be a plain file-name part"]),
    (["--tile_size", "0", "--folds", "1", "--workers", "-2"],
     ["--tile_size must be", "--folds must be", "--workers must be"]),
])
def test_cli_reports_the_config_rules_by_flag_name(small_dataset, capsys, flags, messages):
    with pytest.raises(SystemExit) as info:
        build_lmdb.parse_args(_cli_args(small_dataset, *flags))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert all(m in err for m in messages), err
    assert not (small_dataset / "out").exists()


def test_cli_missing_folder_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        build_lmdb.main(_cli_args(tmp_path))
    assert info.value.code == 2
    assert "--image_folder must be an existing folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_defaults_are_the_build_config_defaults(small_dataset):
    required = dict(image_folder="i", mask_folder="m", output_folder="o", dataset_name="d")
    args = build_lmdb.make_build_parser().parse_args([f"--{k}={v}" for k, v in required.items()])
    assert build_lmdb.config_from_args(args) == BuildConfig(**required)
    help_text = build_lmdb.make_build_parser().format_help()
    for group in ("input:", "split and tiling:", "output:", "runtime:"):
        assert group in help_text


def test_cli_maps_errors_by_class_and_keeps_the_traceback_of_a_bug(small_dataset, monkeypatch, capsys):
    import lib.store.build as build

    def bad_input(*args, **kwargs):
        raise DatasetError(["image img_00.tif is odd"])

    monkeypatch.setattr(build, "build_databases", bad_input)
    assert build_lmdb.main(_cli_args(small_dataset)) == 2
    assert "image img_00.tif is odd" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise ValueError("a programming error, not bad settings")

    monkeypatch.setattr(build, "build_databases", bug)
    with pytest.raises(ValueError, match="a programming error"):
        build_lmdb.main(_cli_args(small_dataset))


def test_dataset_errors_are_bad_input():
    assert issubclass(DatasetError, BadInput) and DatasetError.exit_code == 2
