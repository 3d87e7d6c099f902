"""Each instance representation of issue 17 end to end: train_unet.main trains a tiny model a few
steps, inference.main segments held-back images with it (accuracy is not expected of such a run)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import inference
import train_unet
from lib.store.images import read_mask

TINY = '{"base_filters": 4, "depth": 1, "batch_norm": false, "dropout": 0.0}'


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """Instance databases (64-px tiles of generated touching cells) and two held-back images with masks."""
    from data.generate import generate_dataset
    from lib.store.build import BuildConfig, build_databases

    folder = tmp_path_factory.mktemp("representations")
    generate_dataset(folder / "data", n_images=4, height=64, width=64, n_experts=0, seed=11)
    build_databases(BuildConfig(image_folder=str(folder / "data/images"), mask_folder=str(folder / "data/instances"),
                                output_folder=str(folder / "db"), dataset_name="r", tile_size=64,
                                train_fraction=0.5, mask_type="instance", workers=0),
                    progress=False, log=lambda m: None)
    import shutil

    for kind in ("images", "instances"):  # inference on one image: enough to show the pipeline
        (folder / "one" / kind).mkdir(parents=True)
        first = sorted((folder / "data" / kind).iterdir())[0]
        shutil.copy(first, folder / "one" / kind / first.name)
    return folder


@pytest.mark.parametrize("channels, planes, kinds", [
    ("F,R", 33, {"binary", "ray"}),
    ("F,H,V", 3, {"binary", "distance"}),
    ("F,D,Dc,Dn,B", 5, {"binary", "distance"}),
    ("A", 2, {"binary"}),
    ("E", 5, {"embedding"}),
])
def test_representation_trains_and_infers(generated, tmp_path, channels, planes, kinds):
    import keras

    keras.backend.clear_session()
    run = tmp_path / "run"
    code = train_unet.main(["--train_database", str(generated / "db/train-r.lmdb"),
                            "--test_database", str(generated / "db/test-r.lmdb"), "--output_dir", str(run),
                            "--target", "instance", "--instance_channels", channels, "--model_options", TINY,
                            "--max_steps", "3", "--test_every_n_steps", "3", "--batch_size", "2",
                            "--reader_count", "0", "--seed", "1", "--no_augmentation"])
    assert code == 0
    meta = json.loads((run / "model.json").read_text())
    assert meta["output_channels"] == planes and len(meta["instance"]["channels"]) == planes
    assert set(meta["instance"]["kinds"]) == kinds
    method = meta["instance"]["postprocess"].get("method", "watershed")
    assert method == ("polygons" if "R" in channels else "embedding" if channels == "E" else "watershed")
    out = tmp_path / "out"
    code = inference.main(["--model", str(run), "--image_folder", str(generated / "data/images"),
                           "--output_folder", str(out), "--mask_folder", str(generated / "data/instances"),
                           "--refinements", "voronoi", "--quiet"])
    assert code == 0
    images = sorted(p.stem for p in (generated / "one/images").iterdir())
    for stem in images:
        labels = read_mask(out / f"{stem}.tif", binary_255=False)
        assert labels.shape == (64, 64) and labels.dtype in (np.uint16, np.uint32)
        with open(out / f"{stem}_instances.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == len(np.unique(labels[labels > 0]))
        record = json.loads((out / "records" / f"{stem}.json").read_text())
        assert record["instances"]["found"] == len(rows) and "metrics" in record


@pytest.mark.parametrize("channels, message", [
    ("F,H", "H and V \\(HoVer-Net offsets\\) go together and need F"),
    ("R", "R \\(star-convex polygons\\) need F"),
    ("Dn", "Sets that work: F,C,Db"),
    ("F,R,E", "R \\(polygons\\) and E \\(embedding clustering\\) each make the instances"),
])
def test_invalid_combinations_exit_2(generated, tmp_path, capsys, channels, message):
    import re

    with pytest.raises(SystemExit) as stop:  # refused while reading the command line
        train_unet.main(["--train_database", str(generated / "db/train-r.lmdb"),
                         "--test_database", str(generated / "db/test-r.lmdb"), "--output_dir", str(tmp_path / "x"),
                         "--target", "instance", "--instance_channels", channels, "--max_steps", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "instance targets are invalid" in err
    assert re.search(message, err) and "F,R" in err and "F,H,V" in err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_ray_priors_are_object_means_so_young_models_find_polygons(generated):
    """Rays are learnt on object pixels only; a prior over all pixels would start them near 0, where no candidate
    polygon passes the shortest-ray rule (a 5-minute CPU run of F,R found no object at all that way)."""
    from lib.reader.targets import parse_instance_channels
    from lib.store.lmdb_store import LmdbReader
    from lib.training.inputs import channel_priors

    database = str(generated / "db" / "train-r.lmdb")
    spec = parse_instance_channels("F,R", None)
    priors = channel_priors(database, spec)
    with LmdbReader(database) as reader:
        from lib.reader.targets import make_targets

        targets = np.concatenate([make_targets(np.ascontiguousarray(reader[i][1]), spec)[None]
                                  for i in range(len(reader))])
    rays = [k for k, kind in enumerate(spec.kinds) if kind == "ray"]
    for k in rays:
        plane = targets[..., k]
        assert priors[k] == pytest.approx(plane[plane > 0].mean(), rel=1e-6)
        assert priors[k] > 2 * plane.mean()
    assert priors[0] == pytest.approx(targets[..., 0].mean(), rel=1e-6)  # F: the mean over all pixels
