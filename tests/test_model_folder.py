"""lib.model_folder: the versioned model.json schema (upgrade, refusal), run state, atomic writes, checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lib import model_folder
from lib.common.files import file_mode
from lib.model_folder import (
    MODEL_JSON,
    MODEL_JSON_VERSION,
    ModelError,
    ModelInfo,
    read_model_json,
    upgrade_model_json,
    write_model_json,
)


def description(**changes) -> dict:
    """A semantic model's description as training writes it (no schema fields)."""
    meta = {"architecture": "unet", "model_options": {"depth": 2}, "label_kind": "semantic", "number_classes": 3,
            "input_channels": 1, "input_dtype": "uint16",
            "normalization": {"mode": "dataset", "mean": [300.0], "std": [90.0]},
            "size_divisor": 4, "receptive_field_radius": 23, "best": {"step": 10}}
    meta.update(changes)
    return meta


def test_a_version_1_file_is_upgraded_and_reads_as_finished(tmp_path):
    old = description(format_version=1)
    upgraded = upgrade_model_json(old)
    assert upgraded["format_version"] == MODEL_JSON_VERSION == 2
    assert upgraded["run_state"] == "finished" and upgraded["stopped_because"] == "unknown"
    assert old == description(format_version=1), "the caller's dict is not modified"
    # A file with no format_version at all is version 1.
    (tmp_path / MODEL_JSON).write_text(json.dumps(description()))
    info = read_model_json(tmp_path / MODEL_JSON)
    assert (info.run_state, info.stopped_because) == ("finished", "unknown")
    assert info.meta["format_version"] == MODEL_JSON_VERSION


@pytest.mark.parametrize("version, message", [
    (MODEL_JSON_VERSION + 1, r"format_version must be at most 2 .*got 3 in .*model.json\. It was written by a newer "
                             r"version of the toolkit: update it"),
    ("2", "format_version must be an integer >= 1; got '2'"),
    (0, "format_version must be an integer >= 1; got 0"),
    (True, "format_version must be an integer >= 1; got True"),
])
def test_newer_or_malformed_versions_are_refused(tmp_path, version, message):
    (tmp_path / MODEL_JSON).write_text(json.dumps(description(format_version=version, run_state="finished")))
    with pytest.raises(ModelError, match=message):
        read_model_json(tmp_path / MODEL_JSON)
    with pytest.raises(ModelError, match=message.split(" in ")[0]):
        ModelInfo.from_dict(description(format_version=version))


def test_written_model_json_is_current_validated_and_umask_mode(tmp_path):
    path = write_model_json(tmp_path, description(), run_state="running")
    meta = json.loads(path.read_text())
    assert meta["format_version"] == MODEL_JSON_VERSION and meta["run_state"] == "running"
    assert meta["stopped_because"] is None and "created" in meta and "toolkit_version" in meta
    assert os.stat(path).st_mode & 0o777 == file_mode()
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_JSON], "no temporary file left behind"
    info = read_model_json(path)
    assert (info.run_state, info.stopped_because) == ("running", None)
    # What a reader would refuse is never written.
    with pytest.raises(ModelError, match="number_classes must be an integer >= 2"):
        write_model_json(tmp_path / "bad", description(number_classes=1))
    assert not (tmp_path / "bad" / MODEL_JSON).exists()
    with pytest.raises(ModelError, match="run_state must be one of running, interrupted, failed, finished"):
        ModelInfo.from_dict({**meta, "run_state": "paused"})


def test_run_state_transitions(tmp_path):
    assert not model_folder.set_run_state(tmp_path, "interrupted", "signal SIGTERM"), "no model.json: nothing to mark"
    write_model_json(tmp_path, description())
    assert model_folder.set_run_state(tmp_path, "interrupted", "signal SIGTERM")
    info = read_model_json(tmp_path / MODEL_JSON)
    assert (info.run_state, info.stopped_because) == ("interrupted", "signal SIGTERM")
    model_folder.set_run_state(tmp_path, "finished", "early_stopping")
    info = read_model_json(tmp_path / MODEL_JSON)
    assert (info.run_state, info.stopped_because) == ("finished", "early_stopping")
    assert info.meta["best"] == {"step": 10}, "the rest of model.json is kept"
    with pytest.raises(ValueError, match="run_state must be one of"):
        model_folder.set_run_state(tmp_path, "done")


def test_update_model_json_upgrades_an_old_file(tmp_path):
    (tmp_path / MODEL_JSON).write_text(json.dumps(description()))
    model_folder.update_model_json(tmp_path, lambda meta: meta.update(note="x"))
    meta = json.loads((tmp_path / MODEL_JSON).read_text())
    assert meta["format_version"] == MODEL_JSON_VERSION and meta["note"] == "x" and meta["run_state"] == "finished"


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    keras = pytest.importorskip("keras")
    from lib.models import build_model

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)

    def make(filters: int):
        model = build_model("unet", 1, 2, base_filters=filters, depth=1, batch_norm=False, dropout=0.0)
        optimizer = keras.optimizers.AdamW(learning_rate=1e-3)
        optimizer.build(model.trainable_variables)
        return model, optimizer

    model, optimizer = make(4)
    optimizer.variables[-1].assign(np.full(optimizer.variables[-1].shape, 0.5, "float32"))
    model_folder.save_checkpoint(tmp_path, model, optimizer, {"step": 7})
    model_folder.save_checkpoint(tmp_path, model, optimizer, {"step": 8})  # swapped in over the first
    # The checkpoint it replaced is kept as the fallback of a damaged one.
    assert sorted(p.name for p in tmp_path.iterdir()) == [model_folder.CHECKPOINT, model_folder.CHECKPOINT_PREVIOUS]
    assert json.loads((tmp_path / model_folder.CHECKPOINT_PREVIOUS / model_folder.CHECKPOINT_STATE).read_text()) == {
        "step": 7}
    for name in (model_folder.CHECKPOINT_WEIGHTS, model_folder.CHECKPOINT_OPTIMIZER, model_folder.CHECKPOINT_STATE):
        assert os.stat(tmp_path / model_folder.CHECKPOINT / name).st_mode & 0o777 == file_mode()
    assert model_folder.checkpoint_state(tmp_path) == {"step": 8}
    other, other_optimizer = make(4)
    assert model_folder.load_checkpoint(tmp_path, other, other_optimizer) == {"step": 8}
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(other_optimizer.variables[-1].numpy(), 0.5)
    small, small_optimizer = make(4)
    small_optimizer = keras.optimizers.SGD()
    small_optimizer.build(small.trainable_variables)
    with pytest.raises(model_folder.CheckpointError, match="belongs to a different model"):
        model_folder.load_checkpoint(tmp_path, small, small_optimizer)
    assert model_folder.checkpoint_state(tmp_path / "none") is None


def test_ensemble_members_must_share_their_per_image_normalisation():
    from lib.model_folder import ModelError, ModelInfo, check_members

    def info(**normalization):
        return ModelInfo.from_dict(description(normalization={"mean": [300.0], "std": [90.0], **normalization}))

    dataset_a = info(mode="dataset")
    dataset_b = ModelInfo.from_dict(description(normalization={"mode": "dataset", "mean": [10.0], "std": [2.0]}))
    check_members([dataset_a, dataset_b], ["a", "b"])  # each member keeps its own training statistics
    percentile = info(mode="percentile", percentiles=[1.0, 99.8])
    check_members([percentile, info(mode="percentile", percentiles=[1, 99.8])], ["a", "b"])
    for other in (dataset_a, info(mode="tile"), info(mode="percentile", percentiles=[2.0, 99.0])):
        with pytest.raises(ModelError, match="per-image normalisation .* in a and .* in b"):
            check_members([percentile, other], ["a", "b"])
