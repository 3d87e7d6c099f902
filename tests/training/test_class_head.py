"""A class per instance in training: class planes K0.. as targets, the softmax loss, the trainer's class head."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lib.common.settings import ConfigError
from lib.reader.targets import TargetSpec, channel_kind, make_targets, parse_instance_channels, with_classes

TINY = {"base_filters": 4, "depth": 2, "batch_norm": False, "dropout": 0.0}
NAMES = ("background", "class 1", "class 2", "class 3")


def class_db(folder: Path) -> Path:
    """Train/test databases of generated cells whose objects have a seeded class 1..3."""
    from data.generate import generate_dataset
    from lib.store.build import BuildConfig, build_databases
    from lib.store.images import read_mask, write_image

    generate_dataset(folder / "gen", n_images=6, height=96, width=96, n_experts=0, seed=5)
    for i, path in enumerate(sorted((folder / "gen/instances").glob("*.tif"))):
        ids = read_mask(path, binary_255=False).astype(np.uint16)
        table = np.random.default_rng(i).integers(1, 4, size=int(ids.max()) + 1).astype(np.uint16)
        table[0] = 0
        write_image(folder / "masks" / path.name, np.stack([ids, table[ids]], axis=-1))
    build_databases(BuildConfig(image_folder=str(folder / "gen/images"), mask_folder=str(folder / "masks"),
                                output_folder=str(folder / "db"), dataset_name="k", tile_size=64,
                                train_fraction=0.67, mask_type="instance", workers=0), progress=False,
                    log=lambda m: None)
    return folder / "db"


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return class_db(tmp_path_factory.mktemp("classes"))


def test_class_planes_are_one_hot_of_each_objects_class():
    spec = with_classes(parse_instance_channels("F,C,Db"), NAMES)
    assert spec.channels[-4:] == ("K0", "K1", "K2", "K3") and spec.kinds[-4:] == ("class",) * 4
    assert channel_kind("K12") == "class" and channel_kind("K") is None and channel_kind("K01") is None
    ids = np.array([[0, 1, 1], [2, 2, 0]])
    classes = np.array([[3, 2, 2], [1, 1, 0]])  # background pixels' class is ignored
    planes = make_targets(ids, spec, classes=classes)[..., 3:]
    assert planes.argmax(-1).tolist() == [[0, 2, 2], [1, 1, 0]] and np.all(planes.sum(-1) == 1)
    with pytest.raises(ValueError, match="classes must be an"):
        make_targets(ids, spec)
    with pytest.raises(ValueError, match=r"classes must be in \[0, 4\)"):
        make_targets(ids, spec, classes=np.full((2, 3), 4))
    assert TargetSpec.from_dict(spec.to_dict()) == spec and with_classes(spec, NAMES) is spec


def test_class_planes_are_refused_when_named_by_hand():
    with pytest.raises(ConfigError, match="must not name class planes"):
        parse_instance_channels("F,C,K0,K1")
    with pytest.raises(ConfigError, match="end with the class planes"):
        TargetSpec(channels=("F", "K0", "K1", "C"), class_names=("bg", "a")).validate()
    with pytest.raises(ConfigError, match="background and at least one class"):
        TargetSpec(channels=("F", "K0"), class_names=("bg",)).validate()


def test_class_loss_and_activation_by_hand():
    import tensorflow as tf

    from lib.training.losses import instance_activations, make_instance_loss

    kinds = ("binary", "class", "class", "class")
    targets = np.zeros((1, 1, 2, 5), np.float32)
    targets[0, 0, 0, :4] = [1, 0, 1, 0]
    targets[0, 0, 1, :4] = [0, 1, 0, 0]
    logits = np.zeros((1, 1, 2, 4), np.float32)
    logits[0, 0, 0, 1:] = [0.0, math.log(2.0), 0.0]  # softmax 1/4, 1/2, 1/4
    losses = make_instance_loss(kinds, (1.0,) * 4)(tf.constant(targets), tf.constant(logits)).numpy()
    expected_ce = (math.log(2.0) + math.log(3.0)) / 2  # pixel 0: -log 1/2; pixel 1: -log 1/3
    np.testing.assert_allclose(losses[0, 0], math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(losses[0, 1:], [expected_ce / 3] * 3, rtol=1e-5)
    maps = instance_activations(kinds)(tf.constant(logits)).numpy()
    np.testing.assert_allclose(maps[0, 0, 0], [0.5, 0.25, 0.5, 0.25], rtol=1e-6)
    with pytest.raises(ValueError, match="class planes must be the last"):
        make_instance_loss(("class", "binary", "class"), (1.0,) * 3)


def test_reader_delivers_class_planes(db):
    from lib.reader.imagereader import ImageReader
    from lib.store.lmdb_store import LmdbReader
    from lib.training.config import database_class_names

    names = database_class_names(str(db / "train-k.lmdb"))
    assert names == NAMES
    spec = with_classes(parse_instance_channels("F,C,Db"), names)
    with ImageReader(db / "test-k.lmdb", 2, mode="test", reader_count=0, targets=spec.to_dict()) as reader:
        batch = next(iter(reader.epoch()))
        labels, record = batch.labels.copy(), int(batch.records[0])
    with LmdbReader(db / "test-k.lmdb") as store:
        stored = store[record][1].copy()
    assert labels.shape[-1] == 3 + 4 + 1
    np.testing.assert_array_equal(labels[0, :, :, 3:7].argmax(-1), stored[..., 1])
    np.testing.assert_array_equal(labels[0, :, :, 7], stored[..., 0])


def test_training_learns_the_class_head_and_records_it(db, tmp_path):
    import keras

    from lib.training import train
    from lib.training.config import TrainConfig

    keras.backend.clear_session()
    config = TrainConfig(train_database=str(db / "train-k.lmdb"), test_database=str(db / "test-k.lmdb"),
                         output_dir=str(tmp_path / "run"), number_classes=2, model_options=TINY, batch_size=4,
                         learning_rate=3e-3, test_every_n_steps=10, max_steps=10, reader_count=0,
                         use_augmentation=False, seed=1, mixed_precision=False, target="instance",
                         instance_channels="F,C,Db")
    assert config.output_channels == 3 + 4
    result = train(config, log=lambda m: None)
    assert result.steps == 10
    meta = json.loads((tmp_path / "run/model.json").read_text())
    block = meta["instance"]
    assert block["channels"][-4:] == ["K0", "K1", "K2", "K3"] and block["kinds"][-4:] == ["class"] * 4
    assert block["targets"]["class_names"] == list(NAMES)
    from lib.model_folder import read_model_json

    info = read_model_json(tmp_path / "run/model.json")
    assert info.channel_names[-1] == "K3"


def test_test_database_without_classes_is_refused(db, tmp_path):
    from lib.store.build import BuildConfig, build_databases
    from lib.training.config import TrainConfig, TrainingError
    from lib.training.inputs import check_databases

    src = db.parent
    build_databases(BuildConfig(image_folder=str(src / "gen/images"), mask_folder=str(src / "gen/instances"),
                                output_folder=str(tmp_path / "plain"), dataset_name="p", tile_size=64,
                                train_fraction=0.67, mask_type="instance", workers=0), progress=False,
                    log=lambda m: None)
    config = TrainConfig(train_database=str(db / "train-k.lmdb"), test_database=str(tmp_path / "plain/test-p.lmdb"),
                         output_dir=str(tmp_path / "run"), number_classes=2, model_options=TINY, target="instance")
    with pytest.raises(TrainingError, match="must have the classes per instance of the training database"):
        check_databases(config)
