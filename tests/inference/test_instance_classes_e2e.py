"""A class per instance end to end: inference writes a class per object (CSV column, class map) and matching
per class; build -> train a few steps -> infer -> per-class rows of instance_metrics.csv."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import inference  # noqa: E402
from lib.store.images import read_image, write_image  # noqa: E402

keras = pytest.importorskip("keras")

from lib.instances.postprocess import PostProcessConfig  # noqa: E402
from lib.reader.targets import make_targets, parse_instance_channels, with_classes  # noqa: E402
from lib.scoring.metrics import majority_class  # noqa: E402

NAMES = ("background", "round", "long", "odd")
SPEC = with_classes(parse_instance_channels("F,C,Db"), NAMES)




def seeded_classes(ids: np.ndarray, seed: int) -> np.ndarray:
    table = np.random.default_rng(seed).integers(1, len(NAMES), size=int(ids.max()) + 1).astype(np.uint16)
    table[0] = 0
    return table[ids]


def oracle_folder(folder: Path) -> Path:
    """A model whose logits are its input (1x1 identity convolution), recorded with the class head's planes."""
    n = len(SPEC.channels)
    keras.backend.clear_session()
    inputs = keras.Input((None, None, n), name="image")
    head = keras.layers.Conv2D(n, 1, name="head_logits")
    outputs = head(inputs)
    head.set_weights([np.eye(n, dtype=np.float32)[np.newaxis, np.newaxis], np.zeros(n, np.float32)])
    folder.mkdir(parents=True)
    keras.Model(inputs, outputs).save(folder / "model.keras")
    meta = {"architecture": "oracle", "label_kind": "instance", "number_classes": 2, "output_channels": n,
            "input_channels": n, "input_dtype": "float32",
            "normalization": {"mode": "dataset", "mean": [0.0] * n, "std": [1.0] * n},
            "size_divisor": 1, "receptive_field_radius": 0,
            "instance": {"channels": list(SPEC.channels), "kinds": list(SPEC.kinds), "targets": SPEC.to_dict(),
                         "postprocess": PostProcessConfig.default_for(SPEC.channels).to_dict()}}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_each_object_gets_the_majority_class_and_matching_is_per_class(tmp_path, capsys):
    from data.generate import synthesize

    rng = np.random.default_rng(0)
    truth = {}
    for i, (h, w) in enumerate([(80, 96), (64, 64), (96, 70)]):
        _, ids = synthesize(rng, h, w, (5, 10))
        classes = seeded_classes(ids, i)
        maps = make_targets(ids, SPEC, classes=classes)
        logits = np.where(maps > 0.5, 6.0, -6.0).astype(np.float32)
        logits[..., 2] = maps[..., 2]  # Db: a distance, its own value
        write_image(tmp_path / "images" / f"img_{i}.tif", logits)
        write_image(tmp_path / "masks" / f"img_{i}.tif", np.stack([ids, classes], axis=-1))
        truth[f"img_{i}"] = (ids, classes)
    model = oracle_folder(tmp_path / "model")
    out = tmp_path / "out"
    assert inference.main(["--model", str(model), "--image_folder", str(tmp_path / "images"), "--mask_folder",
                           str(tmp_path / "masks"), "--output_folder", str(out), "--quiet"]) == 0
    agree = total = 0
    for key, (ids, classes) in truth.items():
        labels = read_image(out / f"{key}.tif")[..., 0]
        class_map = read_image(out / f"{key}_classes.tif")[..., 0]
        rows = read_csv(out / f"{key}_instances.csv")
        assert list(rows[0])[:2] == ["label", "class"] and {r["class"] for r in rows} <= set(NAMES[1:])
        by_label = {int(r["label"]): NAMES.index(r["class"]) for r in rows}
        assert majority_class(labels, class_map) == by_label  # the class map paints each object's class
        true_class = majority_class(ids, classes)
        for label, c in majority_class(labels, np.where(labels > 0, classes, 0)).items():
            total += 1
            agree += by_label[label] == c  # the predicted class is the truth's under the object
        assert true_class
    assert agree / total > 0.95
    metrics = read_csv(out / "instance_metrics.csv")
    assert "class" in metrics[0]
    overall = [r for r in metrics if r["class"] == "all"]
    assert len(overall) == 3 * 3 + 3  # the class-agnostic rows as before
    pooled = {(r["class"], r["threshold"]): r for r in metrics if r["image"] == "ALL"}
    for name in NAMES[1:]:
        assert float(pooled[(name, "0.5")]["f1"]) > 0.85
        per_image = [r for r in metrics if r["class"] == name and r["threshold"] == "0.5" and r["image"] != "ALL"]
        assert int(pooled[(name, "0.5")]["n_true"]) == sum(int(r["n_true"]) for r in per_image)
    n_true = sum(int(pooled[(name, "0.5")]["n_true"]) for name in NAMES[1:])
    assert n_true == int(pooled[("all", "0.5")]["n_true"])
    # the same truth as one-channel instance masks and a class mask folder: the same per-class rows
    for key, (ids, classes) in truth.items():
        write_image(tmp_path / "ids" / f"{key}.tif", ids)
        write_image(tmp_path / "classes" / f"{key}.tif", classes)
    split = tmp_path / "split"
    assert inference.main(["--model", str(model), "--image_folder", str(tmp_path / "images"), "--mask_folder",
                           str(tmp_path / "ids"), "--class_mask_folder", str(tmp_path / "classes"),
                           "--output_folder", str(split), "--quiet"]) == 0
    assert read_csv(split / "instance_metrics.csv") == metrics
    # rules on the class: remove every "long" object smaller than 10000 px
    filtered = tmp_path / "filtered"
    assert inference.main(["--model", str(model), "--image_folder", str(tmp_path / "images"), "--output_folder",
                           str(filtered), "--filter_rules", "class == long and npixels < 10000", "--quiet"]) == 0
    rows = read_csv(filtered / "img_0_instances.csv")
    labels = read_image(filtered / "img_0.tif")[..., 0]
    assert {r["status"] for r in rows if r["class"] == "long"} == {"removed"}
    assert {r["status"] for r in rows if r["class"] != "long"} == {"kept"}
    assert set(np.unique(labels[labels > 0])) == {int(r["label"]) for r in rows if r["class"] != "long"}
    # a class the model does not know is refused, naming the ones it knows
    assert inference.main(["--model", str(model), "--image_folder", str(tmp_path / "images"), "--output_folder",
                           str(tmp_path / "typo"), "--filter_rules", "class == lnog", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "filter_rules must name classes of the model ('round', 'long', 'odd'" in err and "'lnog'" in err


def test_build_train_infer_gives_per_class_rows(tmp_path):
    from lib.training import train
    from lib.training.config import TrainConfig
    from tests.training.test_class_head import TINY, class_db

    db = class_db(tmp_path / "data")
    keras.backend.clear_session()
    config = TrainConfig(train_database=str(db / "train-k.lmdb"), test_database=str(db / "test-k.lmdb"),
                         output_dir=str(tmp_path / "run"), number_classes=2, model_options=TINY, batch_size=4,
                         learning_rate=3e-3, test_every_n_steps=5, max_steps=5, reader_count=0,
                         use_augmentation=True, seed=1, mixed_precision=False, target="instance",
                         instance_channels="F,C,Db")
    train(config, log=lambda m: None)
    out = tmp_path / "out"
    assert inference.main(["--model", str(tmp_path / "run"), "--image_folder", str(tmp_path / "data/gen/images"),
                           "--mask_folder", str(tmp_path / "data/masks"), "--output_folder", str(out),
                           "--quiet"]) == 0
    rows = read_csv(out / "cells_000_instances.csv")
    assert not rows or list(rows[0])[1] == "class"
    assert read_image(out / "cells_000_classes.tif").shape[:2] == (96, 96)
    metrics = read_csv(out / "instance_metrics.csv")
    classes = {r["class"] for r in metrics}
    assert classes == {"all", "class 1", "class 2", "class 3"}


def test_class_mask_folder_is_refused_without_masks_or_classes(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "classes").mkdir()
    with pytest.raises(SystemExit) as stop:
        inference.main(["--model", "m", "--image_folder", str(tmp_path / "images"), "--output_folder",
                        str(tmp_path / "out"), "--class_mask_folder", str(tmp_path / "classes")])
    assert stop.value.code == 2
    assert "class_mask_folder needs --mask_folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
