"""Instance training: targets from the reader, per-channel losses, matching statistics at evaluation, model.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from lib.common.settings import ConfigError
from lib.training.config import TrainConfig, TrainingError
from lib.training.inputs import check_databases
from tests.conftest import ROOT

TINY = {"base_filters": 4, "depth": 2, "batch_norm": False, "dropout": 0.0}


@pytest.fixture(scope="module")
def instance_db(tmp_path_factory) -> Path:
    """Train/test databases of instance labels (touching synthetic cells), and a semantic one of the same images."""
    from data.generate import generate_dataset
    from lib.store.build import BuildConfig, build_databases

    folder = tmp_path_factory.mktemp("instances")
    generate_dataset(folder / "data", n_images=6, height=96, width=96, n_experts=0, seed=5)
    for name, masks, kind, classes in (("i", "instances", "instance", None), ("s", "masks", "semantic", 3)):
        build_databases(BuildConfig(image_folder=str(folder / "data/images"), mask_folder=str(folder / "data" / masks),
                                    output_folder=str(folder / "db"), dataset_name=name, tile_size=64,
                                    train_fraction=0.67, mask_type=kind, number_classes=classes, workers=0),
                        progress=False, log=lambda m: None)
    return folder / "db"


def _config(db: Path, out: Path, **kw) -> TrainConfig:
    values = dict(train_database=str(db / "train-i.lmdb"), test_database=str(db / "test-i.lmdb"),
                  output_dir=str(out), number_classes=2, model_options=TINY, batch_size=4, learning_rate=3e-3,
                  test_every_n_steps=10, max_steps=20, reader_count=0, use_augmentation=False, seed=1,
                  mixed_precision=False, target="instance", instance_channels="F,C,Db")
    values.update(kw)
    return TrainConfig(**values)


def test_reader_delivers_targets_and_instance_ids(instance_db):
    from lib.reader.imagereader import ImageReader
    from lib.reader.targets import TargetSpec, make_targets
    from lib.store.lmdb_store import LmdbReader

    spec = TargetSpec(channels=("F", "Db", "C"))
    with ImageReader(instance_db / "test-i.lmdb", 2, mode="test", reader_count=0, targets=spec.to_dict()) as reader:
        assert reader.label_shape == (64, 64, 4) and reader.label_dtype == np.float32
        batch = next(iter(reader.epoch()))
        labels, record = batch.labels.copy(), int(batch.records[0])
    with LmdbReader(instance_db / "test-i.lmdb") as db:
        _, stored = db[record]
        stored = stored.copy()
    ids = labels[0, :, :, 3]
    # Test mode: no augmentation, so the ids are the stored labels and the targets are computed from them.
    np.testing.assert_array_equal(ids, stored.astype(np.float32))
    np.testing.assert_allclose(labels[0, :, :, :3], make_targets(stored, spec), atol=1e-6)
    np.testing.assert_array_equal(labels[0, :, :, 0], (stored > 0).astype(np.float32))


def test_augmented_targets_follow_the_augmented_ids(instance_db):
    from lib.reader.imagereader import ImageReader
    from lib.reader.targets import TargetSpec, make_targets

    spec = TargetSpec(channels=("F", "C", "Db"))
    with ImageReader(instance_db / "train-i.lmdb", 3, mode="train", reader_count=1, patch_shape=48, seed=2,
                     targets=spec.to_dict()) as reader:
        batch = reader.get_batch()
        for b in range(3):
            ids = batch.labels[b, :, :, 3]
            assert np.array_equal(ids, np.round(ids))  # nearest-neighbour ids, never blended
            np.testing.assert_allclose(batch.labels[b, :, :, :3], make_targets(ids.astype(np.int64), spec), atol=1e-6)


def test_targets_need_an_instance_database(instance_db):
    from lib.reader.imagereader import ImageReader
    from lib.reader.targets import TargetSpec

    with pytest.raises(ValueError, match="targets need a database of instance labels"):
        ImageReader(instance_db / "train-s.lmdb", 2, reader_count=0, targets=TargetSpec().to_dict())


def test_instance_losses_by_hand():
    import tensorflow as tf

    from lib.training.losses import instance_activations, make_instance_loss

    targets = np.zeros((1, 2, 2, 3), np.float32)
    targets[0, 0, 0] = [1.0, 0.0, 0.5]
    targets[..., 2] = 0.25  # the ids channel would follow; extra channels are ignored
    logits = np.zeros((1, 2, 2, 2), np.float32)
    logits[0, :, :, 1] = 1.0
    losses = make_instance_loss(("binary", "distance"), (1.0, 2.0), "l1")(tf.constant(targets), tf.constant(logits))
    # Sigmoid cross-entropy of logit 0 is log 2 whatever the target; L1 |1 - 0| on every pixel, weight 2.
    np.testing.assert_allclose(losses.numpy(), [[math.log(2), 2.0]], rtol=1e-6)
    mse = make_instance_loss(("distance", "distance"), (1.0, 1.0), "mse")(tf.constant(targets), tf.constant(logits))
    np.testing.assert_allclose(mse.numpy(), [[0.25, 1.0]], rtol=1e-6)
    maps = instance_activations(("binary", "distance"))(tf.constant([[[[0.0, 1.7], [100.0, -0.3]]]]))
    np.testing.assert_allclose(maps.numpy(), [[[[0.5, 1.0], [1.0, 0.0]]]], atol=1e-6)
    with pytest.raises(ValueError, match="kinds must be"):
        make_instance_loss(("binary", "angle"), (1.0, 1.0))
    with pytest.raises(ValueError, match="one value per channel"):
        make_instance_loss(("binary",), (1.0, 1.0))
    with pytest.raises(ValueError, match="distance_loss must be one of"):
        make_instance_loss(("distance",), (1.0,), "huber")


def test_instance_config_is_validated(tmp_path):
    with pytest.raises(ConfigError) as info:
        TrainConfig("a", "b", str(tmp_path), 2, target="instance", instance_channels="F,Q", loss="dice").validate()
    text = str(info.value)
    assert "instance targets are invalid" in text and "Q" in text
    assert "loss must be left at 'ce'" in text
    with pytest.raises(ConfigError, match="target must be one of semantic, instance"):
        TrainConfig("a", "b", str(tmp_path), 2, target="panoptic").validate()
    assert TrainConfig("a", "b", str(tmp_path), 2, target="instance", instance_channels="F, Db").output_channels == 2


def test_label_kind_must_match_the_target(instance_db, tmp_path):
    with pytest.raises(TrainingError, match="must hold instance labels for --target instance"):
        check_databases(_config(instance_db, tmp_path, train_database=str(instance_db / "train-s.lmdb"),
                                test_database=str(instance_db / "test-s.lmdb")))
    with pytest.raises(TrainingError, match="must hold semantic labels for --target semantic; got 'instance'"):
        check_databases(_config(instance_db, tmp_path, target="semantic"))


def test_instance_training_reports_matching_and_writes_the_contract(instance_db, tmp_path):
    import keras

    from lib.training import train

    keras.backend.clear_session()
    out = tmp_path / "run"
    result = train(_config(instance_db, out), log=lambda m: None)
    assert result.steps == 20
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [10, 20]
    for row in rows:
        assert 0.0 <= float(row["f1"]) <= 1.0 and int(row["objects_true"]) > 0
        assert row["channel_losses"].startswith("F=") and " C=" in row["channel_losses"]
        # The test loss is the sum of the per-channel losses.
        parts = [float(p.split("=")[1]) for p in row["channel_losses"].split()]
        assert float(row["test_loss"]) == pytest.approx(sum(parts), rel=1e-4)
    meta = json.loads((out / "model.json").read_text())
    assert meta["label_kind"] == "instance" and meta["output_channels"] == 3 and meta["number_classes"] == 2
    assert meta["instance"]["channels"] == ["F", "C", "Db"]
    assert meta["instance"]["kinds"] == ["binary", "binary", "distance"]
    assert meta["instance"]["targets"]["channels"] == ["F", "C", "Db"]
    assert "postprocess" in meta["instance"] and "f1" in meta["best"]
    # Post-processing chosen on the validation tiles: never worse than the defaults, and recorded.
    tuning = meta["instance"]["postprocess_tuning"]
    assert tuning["chosen_f1"] >= tuning["default_f1"] and len(tuning["candidates"]) == 40  # 5 Db x 4 C x 2 seed sizes
    chosen = meta["instance"]["postprocess"]
    assert {"thresholds": chosen["thresholds"], "min_seed_size": chosen["min_seed_size"],
            "f1": tuning["chosen_f1"]} in tuning["candidates"]
    model = keras.models.load_model(out / "model.keras", compile=False)
    assert model.output_shape[-1] == 3


def test_cli_needs_number_classes_only_for_semantic(instance_db, tmp_path):
    import subprocess
    import sys

    base = [sys.executable, str(ROOT / "train_unet.py"), "--train_database", str(instance_db / "train-i.lmdb"),
            "--test_database", str(instance_db / "test-i.lmdb"), "--output_dir", str(tmp_path / "x")]
    done = subprocess.run(base, capture_output=True, text=True)
    assert done.returncode == 2 and "--number_classes is required for --target semantic" in done.stderr
    done = subprocess.run(base + ["--target", "instance", "--instance_channels", "F,X", "--max_steps", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "instance targets are invalid" in done.stderr


def test_logit_bias_starts_at_the_target_priors(instance_db):
    import keras

    from lib.models import build_model
    from lib.reader.targets import TargetSpec, make_targets
    from lib.store.lmdb_store import LmdbReader
    from lib.training.inputs import channel_priors, set_head_bias

    spec = TargetSpec(channels=("F", "C", "Db"))
    with LmdbReader(instance_db / "train-i.lmdb") as db:
        stacks = [make_targets(np.ascontiguousarray(db[i][1]), spec) for i in range(len(db))]
    expected = np.concatenate([s.reshape(-1, 3) for s in stacks]).mean(axis=0, dtype=np.float64)
    priors = channel_priors(str(instance_db / "train-i.lmdb"), spec)  # fewer than 64 records: all of them
    np.testing.assert_allclose(priors, expected, rtol=1e-6)
    assert 0 < priors[1] < priors[0] < 1  # contours are a subset of the foreground
    keras.backend.clear_session()
    model = build_model("unet", 1, 3, **TINY)
    set_head_bias(model, [0.2, 0.0, 0.3], spec.kinds)
    bias = model.get_layer("head_logits").bias.numpy()
    # log(0.2 / 0.8); a zero frequency is clipped to 1e-3 (finite log-odds); distances keep their mean.
    np.testing.assert_allclose(bias, [math.log(0.25), math.log(1e-3 / (1 - 1e-3)), 0.3], rtol=1e-5)


def test_postprocess_candidates_start_with_the_defaults():
    from lib.instances.postprocess import PostProcessConfig
    from lib.reader.targets import TargetSpec
    from lib.training.evaluation import postprocess_candidates

    candidates = postprocess_candidates(TargetSpec(channels=("F", "C", "Db")))
    assert candidates[0] == PostProcessConfig.default_for(("F", "C", "Db"))
    # 5 Db x 4 C thresholds x 2 smallest seeds, the defaults once; F stays at 0.5.
    assert len(candidates) == 40 and len(set(map(repr, candidates))) == 40
    assert {c.thresholds["F"] for c in candidates} == {0.5}
    assert len(postprocess_candidates(TargetSpec(channels=("F",)))) == 2  # only the smallest seed varies


@pytest.mark.parametrize("extra, learning_rate, options", [
    (["--number_classes", "2"], 1e-3, {}),
    (["--target", "instance"], 1e-3, {"base_filters": 32}),
    (["--target", "instance", "--learning_rate", "2e-4", "--model_options", '{"base_filters": 8}'], 2e-4,
     {"base_filters": 8}),
    (["--target", "instance", "--architecture", "fc-densenet56"], 1e-3, {}),
])
def test_cli_defaults(extra, learning_rate, options):
    from train_unet import ARCHITECTURES, build_parser, config_from_args

    parser = build_parser("train_unet.py", "", ARCHITECTURES, "unet", "--architecture")
    args = parser.parse_args(["--train_database", "a.lmdb", "--test_database", "b.lmdb", "--output_dir", "out",
                              *extra])
    config = config_from_args(args, parser, ARCHITECTURES)
    assert config.learning_rate == learning_rate and config.model_options == options
    assert config.patch_size is None  # resolved against the tile size by train_patch


@pytest.mark.parametrize("target, patch, tile, divisor, expected", [
    ("instance", None, 256, 16, 128), ("instance", None, 96, 16, 96), ("instance", 64, 256, 16, 64),
    ("semantic", None, 256, 16, 128), ("semantic", None, 128, 16, 128), ("instance", None, 256, 48, 256),
    ("instance", None, None, 16, None),
])
def test_train_patch(target, patch, tile, divisor, expected):
    from lib.training.inputs import train_patch

    config = TrainConfig(train_database="a", test_database="b", output_dir="o", number_classes=2, target=target,
                         patch_size=patch)
    assert train_patch(config, tile, divisor) == expected
