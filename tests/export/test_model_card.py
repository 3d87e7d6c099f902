"""Model card, cover picture and the bioimage.io description pieces that need no model (issue 15, item 5)."""

from __future__ import annotations

import numpy as np
import pytest

from lib.model_folder import ModelInfo

BASE = {"architecture": "fc-densenet56", "number_classes": 3, "input_channels": 2, "input_dtype": "uint8",
        "normalization": {"mode": "dataset", "mean": [10.0, 20.0], "std": [2.0, 0.0]}, "size_divisor": 32,
        "receptive_field_radius": 439, "run_state": "finished", "format_version": 2,
        "data": {"dataset_name": "nist", "train_records": 120, "test_records": 40, "build_command": "build_lmdb.py"},
        "best": {"mean_iou": 0.75, "iou": [0.9, 0.7, 0.65], "step": 900}}
INSTANCE = {**BASE, "architecture": "unet", "label_kind": "instance", "number_classes": 2, "output_channels": 3,
            "instance": {"channels": ["F", "C", "Db"], "kinds": ["binary", "binary", "distance"]}}


def test_semantic_description_uses_the_spec_operations_and_geometry():
    from lib.export.bioimageio import _postprocessing, _preprocessing, geometry

    info = ModelInfo.from_dict(BASE)
    assert geometry(info) == (2 * 448 + 32, 32, 448)  # halo: 439 rounded up to the divisor
    steps = _preprocessing(info)
    assert [s["id"] for s in steps] == ["ensure_dtype", "fixed_zero_mean_unit_variance", "ensure_dtype"]
    assert steps[1]["kwargs"] == {"mean": [10.0, 20.0], "std": [2.0, 1.0], "axis": "channel"}  # std 0 divides by 1
    assert _postprocessing(info)[0] == [{"id": "softmax", "kwargs": {"axis": "channel"}}]
    tile = ModelInfo.from_dict({**BASE, "normalization": {"mode": "tile", "mean": [0, 0], "std": [1, 1]}})
    assert _preprocessing(tile)[1] == {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"]}}
    percentile = ModelInfo.from_dict({**BASE, "normalization": {"mode": "percentile", "mean": [0, 0], "std": [1, 1],
                                                                "percentiles": [2.0, 99.5]}})
    assert _preprocessing(percentile)[1] == {"id": "scale_range", "kwargs": {
        "axes": ["y", "x"], "min_percentile": 2.0, "max_percentile": 99.5, "eps": 1e-6}}


def test_instance_models_get_sigmoid_only_when_every_channel_is_binary():
    from lib.export.bioimageio import _postprocessing

    mixed = ModelInfo.from_dict(INSTANCE)
    post, description = _postprocessing(mixed)
    assert post == [] and "logits" in description
    binary = ModelInfo.from_dict({**INSTANCE, "output_channels": 2,
                                  "instance": {"channels": ["F", "C"], "kinds": ["binary", "binary"]}})
    assert _postprocessing(binary)[0] == [{"id": "sigmoid"}]


def test_card_names_architecture_channels_data_metrics_and_commands():
    from lib.export.model_card import card_text

    card = card_text(ModelInfo.from_dict(BASE), "db record 3")
    for needle in ("fc-densenet56", "Jegou", "10.1109/CVPRW.2017.156", "class_0 (background)", "2 channel(s) of uint8",
                   "mean [10.0, 20.0]", "120 training tiles", "## Validation", "| mean_iou | 0.7500 |",
                   "inference.py --model", "export_model.py", "keras.saving.load_model", "db record 3"):
        assert needle in card, needle
    instance = card_text(ModelInfo.from_dict(INSTANCE))
    assert "F (binary), C (binary), Db (distance)" in instance and "Ronneberger" in instance


def test_cover_is_image_beside_its_overlay_and_instance_labels_are_objects():
    from lib.export.model_card import cover_picture, prediction_labels

    image = np.zeros((16, 16, 1), np.uint16)
    image[4:8, 4:8] = 1000
    maps = np.zeros((16, 16, 3), np.float32)
    maps[4:8, 4:8, 0] = maps[10:12, 10:12, 0] = 0.9
    labels = prediction_labels(ModelInfo.from_dict(INSTANCE), maps)
    assert labels.max() == 2 and labels[5, 5] != labels[11, 11]
    picture = cover_picture(image, labels)
    assert picture.shape == (16, 40, 3) and picture.dtype == np.uint8
    assert (picture[:, :16] != picture[:, 24:]).any() and (picture[:, 16:24] == 255).all()
    assert (picture[0, :16] == picture[0, 24:]).all()  # unlabelled pixels are shown as they are


def test_mirroring_up_to_the_minimum_size_and_yaml_text():
    from lib.export.bioimageio import at_least, to_yaml

    image = np.arange(2 * 3).reshape(2, 3, 1)
    grown = at_least(image, 8)
    assert grown.shape == (8, 8, 1) and (grown[:2, :3] == image).all() and grown[2, 0, 0] == image[1, 0, 0]
    assert to_yaml({"a": [{"b": 1, "c": "x: y"}, 2], "d": {}}) == 'a:\n  - b: 1\n    c: "x: y"\n  - 2\nd: {}'


@pytest.mark.parametrize("mode", ["histogram_matching"])
def test_unknown_normalisation_is_refused(mode):
    from lib.export.bioimageio import _preprocessing
    from lib.export.model_card import ExportError

    info = ModelInfo.from_dict(BASE)
    object.__setattr__(info, "normalization", mode)  # a mode a newer toolkit might write
    with pytest.raises(ExportError, match="normalization mode must be"):
        _preprocessing(info)
