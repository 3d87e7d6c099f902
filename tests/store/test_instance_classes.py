"""A class per instance at build time: two-channel masks, a class mask folder, the checks, the records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import build_lmdb
from lib.store.build import BuildConfig, build_databases
from lib.store.images import read_mask, write_image
from lib.store.instance_classes import instance_class_table
from lib.store.lmdb_store import LmdbReader

K = 3


def classes_of(instances: np.ndarray, seed: int) -> np.ndarray:
    """A class mask giving each object of ``instances`` a seeded class 1..K (0 on background)."""
    ids = np.unique(instances)
    table = np.zeros(int(ids.max()) + 1, np.uint16)
    table[ids[ids > 0]] = np.random.default_rng(seed).integers(1, K + 1, size=int((ids > 0).sum()))
    return table[instances]


def make_data(folder: Path, layout: str = "hwc", n: int = 4, size: int = 64) -> Path:
    """Generated cells with classes: ``layout`` 'hwc' or 'chw' (two-channel TIFFs) or 'folder' (class masks)."""
    from data.generate import generate_dataset

    generate_dataset(folder / "gen", n_images=n, height=size, width=size, n_experts=0, seed=5)
    for i, path in enumerate(sorted((folder / "gen/instances").glob("*.tif"))):
        instances = read_mask(path, binary_255=False).astype(np.uint16)
        classes = classes_of(instances, i)
        write_image(folder / "images" / path.name, read_mask(folder / "gen/images" / path.name, binary_255=False))
        if layout == "folder":
            write_image(folder / "instances" / path.name, instances)
            write_image(folder / "classes" / path.name, classes)
        elif layout == "hwc":
            write_image(folder / "instances" / path.name, np.stack([instances, classes], axis=-1))
        else:  # (2, H, W), as numpy users save it, no axes metadata
            import tifffile

            (folder / "instances").mkdir(exist_ok=True)
            tifffile.imwrite(folder / "instances" / path.name, np.stack([instances, classes]))
    return folder


def build(folder: Path, **extra) -> list[str]:
    argv = ["--image_folder", str(folder / "images"), "--mask_folder", str(folder / "instances"),
            "--output_folder", str(folder / "db"), "--dataset_name", "c", "--mask_type", "instance",
            "--tile_size", "32", "--workers", "0", "--quiet", "--train_fraction", "0.75"]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    return argv


@pytest.mark.parametrize("layout", ["hwc", "chw", "folder"])
def test_classes_are_stored_as_a_second_label_channel(tmp_path, layout):
    data = make_data(tmp_path, layout)
    extra = {"class_mask_folder": data / "classes"} if layout == "folder" else {}
    assert build_lmdb.main(build(data, **extra)) == 0
    with LmdbReader(data / "db/train-c.lmdb") as db:
        meta = db.metadata
        assert meta["label_channels"] == 2 and meta["instance_classes"] == K
        assert meta["class_names"][0] == "background" and len(meta["class_names"]) == K + 1
        assert sum(meta["instance_class_counts"][1:]) > 0 and meta["instance_class_counts"][0] == 0
        seen = set()
        for i in range(len(db)):
            _, label = db[i]
            assert label.shape == (32, 32, 2)
            ids, cls = label[..., 0], label[..., 1]
            assert np.all((cls == 0) == (ids == 0))  # background has class 0, objects 1..K
            uid, best, n = instance_class_table(ids, cls)
            assert np.all(n == 1)  # one class per object
            seen |= set(best.tolist())
        assert seen <= set(range(1, K + 1)) and len(seen) >= 2


def test_one_channel_instance_masks_build_as_before(tmp_path):
    data = make_data(tmp_path, "folder")
    assert build_lmdb.main(build(data)) == 0
    with LmdbReader(data / "db/train-c.lmdb") as db:
        assert "instance_classes" not in db.metadata and db[0][1].ndim == 2


def test_instance_spanning_two_classes_is_refused_by_file(tmp_path, capsys):
    data = make_data(tmp_path, "folder")
    bad = sorted((data / "classes").glob("*.tif"))[1]
    classes = read_mask(bad, binary_255=False)
    instances = read_mask(data / "instances" / bad.name, binary_255=False)
    obj = int(np.unique(instances[instances > 0])[0])
    ys, xs = np.nonzero(instances == obj)
    classes[ys[0], xs[0]] = classes[ys[0], xs[0]] % K + 1  # one pixel of another class
    bad.unlink()
    write_image(bad, classes)
    assert build_lmdb.main(build(data, class_mask_folder=data / "classes")) == 2
    err = capsys.readouterr().err
    assert "each instance must have one class" in err and bad.name in err and f"ids {obj}" in err
    assert not (data / "db/train-c.lmdb").exists()


def test_missing_class_mask_is_refused(tmp_path, capsys):
    data = make_data(tmp_path, "folder")
    gone = sorted((data / "classes").glob("*.tif"))[0]
    gone.unlink()
    assert build_lmdb.main(build(data, class_mask_folder=data / "classes")) == 2
    err = capsys.readouterr().err
    assert "class mask must exist for every instance mask" in err and gone.name in err
    assert not (data / "db").exists() or not any((data / "db").iterdir())


def test_object_without_class_and_mixed_channel_counts_are_refused(tmp_path, capsys):
    data = make_data(tmp_path, "hwc")
    paths = sorted((data / "instances").glob("*.tif"))
    both = np.stack([read_mask(paths[0], binary_255=False), np.zeros((64, 64), np.uint16)], -1)
    paths[0].unlink()
    write_image(paths[0], both.astype(np.uint16))  # all objects of class 0
    ids = read_mask(paths[1], binary_255=False)
    paths[1].unlink()
    write_image(paths[1], ids)  # one channel among two-channel masks
    assert build_lmdb.main(build(data)) == 2
    err = capsys.readouterr().err
    assert "must have a class >= 1" in err and paths[0].name in err
    assert "all have two channels" in err and paths[1].name in err


def test_class_mask_folder_needs_instance_masks(tmp_path):
    data = make_data(tmp_path, "folder", n=2)
    with pytest.raises(ValueError, match="class_mask_folder must go with --mask_type instance"):
        BuildConfig(image_folder=str(data / "images"), mask_folder=str(data / "instances"),
                    output_folder=str(data / "db"), dataset_name="c", class_mask_folder=str(data / "classes"),
                    workers=0).validate()
    with pytest.raises(ValueError, match="class_mask_folder must be an existing folder"):
        build_databases(BuildConfig(image_folder=str(data / "images"), mask_folder=str(data / "instances"),
                                    output_folder=str(data / "db"), dataset_name="c", mask_type="instance",
                                    class_mask_folder=str(data / "nowhere"), workers=0), progress=False)


def test_majority_table():
    ids = np.array([[1, 1, 1, 2], [0, 2, 2, 3]])
    cls = np.array([[2, 2, 1, 3], [5, 3, 3, 1]])
    uid, best, n = instance_class_table(ids, cls)
    assert uid.tolist() == [1, 2, 3] and best.tolist() == [2, 3, 1] and n.tolist() == [2, 1, 1]


def test_grey_and_alpha_png_instance_masks_stay_one_channel(tmp_path):
    from PIL import Image

    data = make_data(tmp_path, "folder", n=3)
    for path in sorted((data / "instances").glob("*.tif")):
        ids = read_mask(path, binary_255=False)
        assert ids.max() < 256
        grey_alpha = np.stack([ids.astype(np.uint8), np.full(ids.shape, 255, np.uint8)], -1)
        Image.fromarray(grey_alpha, "LA").save(path.with_suffix(".png"))
        path.unlink()
    assert build_lmdb.main(build(data)) == 0
    with LmdbReader(data / "db/train-c.lmdb") as db:
        assert "instance_classes" not in db.metadata and db[0][1].ndim == 2
