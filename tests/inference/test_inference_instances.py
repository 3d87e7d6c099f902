"""Inference with instance-segmentation models: maps, post-processing of the stitched maps, outputs, evaluation.

Most tests use an "oracle" model: one linear 1x1 convolution with an identity kernel, fed
float32 images that hold the logits of the perfect maps of known instance labels (F and C as
+-6, Db as is). Its maps are then the perfect maps (through the real sigmoid / clip), so the
post-processing, the evaluation and every output can be checked against the truth.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[2]

import inference  # noqa: E402
from lib.store.images import read_image, write_image

keras = pytest.importorskip("keras")

from lib.inference.instances_glue import segment_instances
from lib.inference.predictor import predictor_from_models
from lib.inference.tiled import predict_image, predict_whole
from lib.common import pictures
from lib.instances.measure import measurement_columns
from lib.instances.postprocess import PostProcessConfig, postprocess
from lib.model_folder import ModelError, ModelInfo, find_models
from lib.models import build_model, model_geometry  # noqa: E402
from lib.reader.targets import TargetSpec, make_targets

CHANNELS = ("F", "C", "Db")
KINDS = ("binary", "binary", "distance")


def instance_json(channels=CHANNELS, kinds=KINDS, input_channels: int | None = None, architecture="oracle",
                  divisor: int = 1, radius: int = 0, dtype: str = "float32", mean: float = 0.0,
                  std: float = 1.0) -> dict:
    input_channels = len(channels) if input_channels is None else input_channels
    return {"architecture": architecture, "label_kind": "instance", "number_classes": 2,
            "output_channels": len(channels), "input_channels": input_channels, "input_dtype": dtype,
            "normalization": {"mode": "dataset", "mean": [mean] * input_channels, "std": [std] * input_channels},
            "size_divisor": divisor, "receptive_field_radius": radius,
            "instance": {"channels": list(channels), "kinds": list(kinds),
                         "targets": TargetSpec(tuple(channels)).to_dict(),
                         "postprocess": PostProcessConfig.default_for(channels).to_dict()}}


def oracle_model(channels: int = 3):
    """Logits = input: a 1x1 convolution with an identity kernel (receptive-field radius 0)."""
    keras.backend.clear_session()
    inputs = keras.Input((None, None, channels), name="image")
    head = keras.layers.Conv2D(channels, 1, name="head_logits")
    outputs = head(inputs)
    head.set_weights([np.eye(channels, dtype=np.float32)[np.newaxis, np.newaxis], np.zeros(channels, np.float32)])
    return keras.Model(inputs, outputs)


def perfect_logits(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits image (H, W, 3) float32, perfect maps (H, W, 3) float32) of instance ``labels``."""
    maps = make_targets(labels, TargetSpec(CHANNELS))
    logits = maps.copy()
    logits[..., :2] = np.where(maps[..., :2] > 0.5, 6.0, -6.0)
    return logits.astype(np.float32), maps


def disks(shape, centres, radius: float) -> np.ndarray:
    """Instance labels: a disk per centre, ids 1.. in order; later disks do not overwrite earlier ones."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.uint16)
    for label, (cy, cx) in enumerate(centres, 1):
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & (labels == 0)
        labels[inside] = label
    return labels


@pytest.fixture
def instance_data(tmp_path) -> Path:
    """Four synthetic images (logits of perfect maps, float32) and their instance masks (uint16)."""
    from data.generate import synthesize

    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate([(80, 96), (64, 64), (50, 90), (96, 70)]):
        _, labels = synthesize(rng, height, width, (5, 10))
        logits, _ = perfect_logits(labels)
        write_image(tmp_path / "data" / "images" / f"img_{i:02d}.tif", logits)
        write_image(tmp_path / "data" / "masks" / f"img_{i:02d}.tif", labels)
    return tmp_path / "data"


def run(*args) -> int:
    return inference.main([str(a) for a in args] + ["--quiet"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# Post-processing runs on the stitched maps


def test_objects_crossing_tile_borders_stay_whole():
    # Touching and separate disks placed across the borders of 16-px zones.
    centres = [(15, 15), (15, 33), (40, 16), (44, 47), (70, 30), (66, 70), (30, 78), (80, 80)]
    truth = disks((96, 100), centres, 9.5)
    logits, maps = perfect_logits(truth)
    predictor = predictor_from_models([(oracle_model(), instance_json())])
    prediction = predict_image(predictor, logits, tile_size=16, batch_size=5)
    assert prediction.labels is None and prediction.plan.n_tiles == 42
    zones = prediction.plan.zones()
    crossing = {int(v) for y0, y1, x0, x1 in zones for v in np.unique(truth[y0:y1, x0:x1])} - {0}
    assert all(sum(1 for y0, y1, x0, x1 in zones if (truth[y0:y1, x0:x1] == k).any()) > 1 for k in crossing)
    expected = maps.copy()
    expected[..., :2] = 1 / (1 + np.exp(-logits[..., :2]))
    assert np.abs(prediction.probabilities - expected).max() < 1e-6
    config = PostProcessConfig.default_for(CHANNELS)
    segmentation = segment_instances(prediction.probabilities, config)
    assert not segmentation.windowed and segmentation.labels.dtype == np.uint16
    assert segmentation.labels.max() == len(centres)
    from lib.scoring.metrics import match_instances

    assert match_instances(truth, segmentation.labels).stats[0.75].f1 == 1.0
    # The rule matters: the same post-processing zone by zone splits (or loses) objects.
    per_zone = sum(int(postprocess(np.ascontiguousarray(prediction.probabilities[y0:y1, x0:x1]), config).max())
                   for y0, y1, x0, x1 in zones)
    assert per_zone > len(centres)
    # Window by window (windows much smaller than the image): the same labels.
    windowed = segment_instances(prediction.probabilities, config, window=64, overlap=48)
    assert windowed.windowed and np.array_equal(windowed.labels, segmentation.labels)


def test_tiled_maps_of_an_instance_unet_equal_whole_image_maps():
    options = {"base_filters": 4, "depth": 2}
    divisor, radius = model_geometry("unet", **options)
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = build_model("unet", 1, 3, **options)
    meta = instance_json(input_channels=1, architecture="unet", divisor=divisor, radius=radius, dtype="uint16",
                         mean=300.0, std=90.0)
    predictor = predictor_from_models([(model, meta)])
    image = np.random.default_rng(1).integers(0, 600, (77, 131, 1)).astype(np.uint16)
    whole = predict_whole(predictor, image)
    prediction = predict_image(predictor, image, tile_size=52, batch_size=3)
    assert prediction.plan.n_tiles > 1 and prediction.probabilities.shape == (77, 131, 3)
    assert np.abs(prediction.probabilities - whole).max() < 1e-4
    assert 0 <= whole.min() and whole.max() <= 1
    # Activations: sigmoid for F and C, clip to [0, 1] for Db (a crop the model takes as it is).
    crop = image[:76, :128]
    logits = np.asarray(model(((crop.astype(np.float32) - 300) / 90)[np.newaxis]))[0]
    maps = predict_whole(predictor, crop, halo=0)
    assert np.abs(maps[..., :2] - 1 / (1 + np.exp(-logits[..., :2]))).max() < 1e-5
    assert np.abs(maps[..., 2] - np.clip(logits[..., 2], 0, 1)).max() < 1e-5
    assert (logits[..., 2] < 0).any()
    # Ensembles average the maps; test-time augmentation keeps them in [0, 1].
    keras.utils.set_random_seed(1)
    other = build_model("unet", 1, 3, **options)
    pair = predict_whole(predictor_from_models([(model, meta), (other, meta)]), image)
    single = predict_whole(predictor_from_models([(other, meta)]), image)
    assert np.abs(pair - (whole + single) / 2).max() < 1e-5
    tta = predict_image(predictor_from_models([(model, meta)], tta=True), image, keep_uncertainty=True)
    assert tta.probabilities.shape == whole.shape and 0 <= tta.probabilities.min() <= tta.probabilities.max() <= 1
    assert tta.spread is not None and 0 <= tta.scores["mean_entropy"] <= 1


# Model metadata and ensembles


@pytest.mark.parametrize("change, message", [
    ({"instance": None}, "instance must be an object"),
    ({"instance": {"channels": ["F", "C"], "kinds": ["binary"]}}, "instance.kinds must have one entry per channel"),
    ({"instance": {"channels": ["F", "F"], "kinds": ["binary", "binary"]}}, "distinct channel names"),
    ({"instance": {"channels": ["F"], "kinds": ["sigmoid"]}}, "instance.kinds must be a list of binary or distance"),
    ({"output_channels": 4}, "output_channels must equal the number of instance.channels (3); got 4"),
    ({"label_kind": "panoptic"}, "label_kind must be one of semantic, instance"),
])
def test_instance_model_json_errors(change, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelInfo.from_dict({**instance_json(), **change})


def test_instance_model_info():
    info = ModelInfo.from_dict(instance_json())
    assert info.label_kind == "instance" and info.output_channels == 3
    assert info.channel_names == CHANNELS and info.channel_kinds == KINDS


@pytest.mark.parametrize("second, message", [
    (instance_json(channels=("F", "Db"), kinds=("binary", "distance"), input_channels=3),
     "must agree on channel_names; got F,C,Db"),
    (instance_json(kinds=("binary", "distance", "distance")), "must agree on channel_kinds"),
    ({**instance_json(), "label_kind": "semantic", "number_classes": 3, "instance": None},
     "must all be semantic or all instance models"),
])
def test_ensemble_members_must_agree(second, message, tmp_path):
    model = oracle_model()
    with pytest.raises(ModelError, match=message):
        predictor_from_models([(model, instance_json()), (model, second)])
    for name, meta in (("a", instance_json()), ("b", second)):
        (tmp_path / "ens" / name).mkdir(parents=True)
        (tmp_path / "ens" / name / "model.keras").write_bytes(b"")
        (tmp_path / "ens" / name / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=message):
        find_models(tmp_path / "ens")


# inference.py end to end


def test_instance_outputs_and_evaluation(oracle_folder, instance_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = run("--model", oracle_folder, "--image_folder", instance_data / "images", "--mask_folder",
               instance_data / "masks", "--output_folder", out, "--tile_size", "32", "--probabilities",
               "--uncertainty", "--save_intermediates", "--pixel_size", "0.5")
    assert code == 0
    printed = capsys.readouterr().out
    assert "instance matching over all images: F1 at IoU 0.5" in printed and "foreground (labels > 0" in printed
    for i, shape in enumerate([(80, 96), (64, 64), (50, 90), (96, 70)]):
        key = f"img_{i:02d}"
        labels = read_image(out / f"{key}.tif")[..., 0]
        assert labels.shape == shape and labels.dtype == np.uint16
        for name in CHANNELS:
            channel = read_image(out / "probabilities" / f"{key}_{name}.tif")
            assert channel.shape == shape + (1,) and channel.dtype == np.float32
        assert read_image(out / "intermediates" / f"{key}_seeds.tif").dtype == np.uint32
        assert read_image(out / "intermediates" / f"{key}_surface.tif").dtype == np.float32
        growth = read_image(out / "intermediates" / f"{key}_growth.tif")
        assert growth.dtype == np.uint8 and set(np.unique(growth)) <= {0, 1}
        assert read_image(out / "uncertainty" / f"{key}_entropy.tif").shape == shape + (1,)
        overlay = read_image(out / "overlays" / f"{key}.png")  # enlarged, a legend strip below
        factor = min(pictures.MAX_ENLARGEMENT, -(-pictures.READABLE_SIDE // max(shape)))
        assert overlay.shape[1] == max(shape[1] * factor, pictures.LEGEND_MIN_WIDTH) and overlay.shape[0] > shape[0] * factor
        rows = read_csv(out / f"{key}_instances.csv")
        assert list(rows[0]) == list(measurement_columns(0.5)) and len(rows) == labels.max()
        assert float(rows[0]["area_um2"]) == pytest.approx(int(rows[0]["npixels"]) * 0.25)
        associations = read_csv(out / "associations" / f"{key}.csv")
        assert list(associations[0]) == ["image", "threshold", "true_id", "pred_id", "iou", "status"]
        assert {row["threshold"] for row in associations} == {"0.3", "0.5", "0.75"}
        record = json.loads((out / "records" / f"{key}.json").read_text())
        assert record["instances"]["found"] == labels.max() and record["plan"]["tiles"] > 1
    metrics = read_csv(out / "instance_metrics.csv")
    assert list(metrics[0])[:5] == ["image", "threshold", "tp", "fp", "fn"] and "panoptic_quality" in metrics[0]
    assert len(metrics) == 4 * 3 + 3
    pooled = {float(row["threshold"]): row for row in metrics if row["image"] == "ALL"}
    assert sorted(pooled) == [0.3, 0.5, 0.75]
    assert int(pooled[0.5]["tp"]) == sum(int(r["tp"]) for r in metrics if r["threshold"] == "0.5" and
                                         r["image"] != "ALL")
    assert float(pooled[0.5]["f1"]) > 0.9  # perfect maps: what is lost are synthetic objects cut in pieces
    semantic = read_csv(out / "metrics.csv")
    assert semantic[-1]["image"] == "ALL" and float(semantic[-1]["iou_1"]) > 0.95
    settings = json.loads((out / "inference.json").read_text())
    assert settings["label_kind"] == "instance" and settings["instance"]["postprocess"]["surface_channel"] == "C"
    assert settings["instance"]["pixel_size"] == 0.5


def test_filter_rules_and_post_processing_overrides(oracle_folder, instance_data, tmp_path):
    out = tmp_path / "out"
    assert run("--model", oracle_folder, "--image_folder", instance_data / "images", "--output_folder", out,
               "--filter_rules", "npixels < 150; circularity < 0.5", "--thresholds", "Db=auto,growth=0.4",
               "--refinements", "fill_holes, remove_small_objects 20", "--shard", "0/2") == 0
    rows = read_csv(out / "img_00_instances.csv")
    assert list(rows[0])[-1] == "status" and {r["status"] for r in rows} == {"kept", "removed"}
    for row in rows:
        small = int(row["npixels"]) < 150 or float(row["circularity"]) < 0.5
        assert row["status"] == ("removed" if small else "kept")
    labels = read_image(out / "img_00.tif")[..., 0]
    assert sorted(set(np.unique(labels)) - {0}) == sorted(int(r["label"]) for r in rows if r["status"] == "kept")
    post = json.loads((out / "inference.json").read_text())["instance"]["postprocess"]
    assert post["thresholds"] == {"F": 0.5, "C": 0.5, "Db": "auto"} and post["growth_threshold"] == 0.4
    assert post["refinements"] == ["fill_holes", "remove_small_objects 20"]
    record = json.loads((out / "records" / "img_00.json").read_text())
    assert record["instances"]["removed"] == sum(r["status"] == "removed" for r in rows) > 0


def test_large_images_stream_and_post_process_by_windows(oracle_folder, instance_data, tmp_path, monkeypatch):
    import lib.inference.runner
    import lib.inference.tiled

    args = ["--model", oracle_folder, "--image_folder", instance_data / "images", "--mask_folder",
            instance_data / "masks", "--probabilities", "--tile_size", "32"]
    assert run(*args, "--output_folder", tmp_path / "memory") == 0
    monkeypatch.setattr(lib.inference.runner, "STREAM_PIXELS", 4000)
    monkeypatch.setattr(lib.inference.tiled, "TIFF_TILE", 16)
    assert run(*args, "--output_folder", tmp_path / "stream", "--postprocess_window", "64",
               "--postprocess_overlap", "60") == 0
    for key in ("img_00", "img_03"):  # 7680 and 6720 pixels: streamed, and longer than a window
        record = json.loads((tmp_path / "stream" / "records" / f"{key}.json").read_text())
        assert record["plan"]["streamed"] and record["instances"]["windowed"]
        assert np.array_equal(read_image(tmp_path / "stream" / f"{key}.tif"),
                              read_image(tmp_path / "memory" / f"{key}.tif"))
        assert np.array_equal(read_image(tmp_path / "stream" / "probabilities" / f"{key}_Db.tif"),
                              read_image(tmp_path / "memory" / "probabilities" / f"{key}_Db.tif"))
        assert not (tmp_path / "stream" / "overlays" / f"{key}.png").exists()
    assert (tmp_path / "stream" / "instance_metrics.csv").read_text() == \
        (tmp_path / "memory" / "instance_metrics.csv").read_text()
    assert not list((tmp_path / "stream").rglob("*.partial*"))


def test_rerun_skips_and_other_post_processing_is_refused(oracle_folder, instance_data, tmp_path, capsys):
    args = ["--model", oracle_folder, "--image_folder", instance_data / "images", "--output_folder",
            tmp_path / "out", "--save_intermediates"]
    assert run(*args) == 0
    capsys.readouterr()
    assert run(*args) == 0
    assert "0 predicted, 4 skipped" in capsys.readouterr().out
    assert run(*args, "--refinements", "fill_holes") == 2
    assert "made with others (instance:" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--output_format", "png"], "output_format must be tif for an instance model"),
    (["--thresholds", "P=0.5"], "thresholds must only name seed channels"),
])
def test_instance_setting_errors_exit_2(oracle_folder, instance_data, tmp_path, extra, message, capsys):
    assert run("--model", oracle_folder, "--image_folder", instance_data / "images", "--output_folder",
               tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_instance_flags_are_refused_for_a_semantic_model(tmp_path, capsys):
    from tests.conftest import write_pairs

    keras.backend.clear_session()
    folder = tmp_path / "semantic"
    folder.mkdir()
    build_model("unet", 1, 2, base_filters=4, depth=1).save(folder / "model.keras")
    divisor, radius = model_geometry("unet", base_filters=4, depth=1)
    (folder / "model.json").write_text(json.dumps({
        "architecture": "unet", "number_classes": 2, "input_channels": 1, "input_dtype": "uint16",
        "normalization": {"mode": "dataset", "mean": [0.0], "std": [1.0]}, "size_divisor": divisor,
        "receptive_field_radius": radius}))
    data = write_pairs(tmp_path / "data", [(20, 20)])
    assert run("--model", folder, "--image_folder", data / "images", "--output_folder", tmp_path / "out",
               "--filter_rules", "npixels < 5", "--pixel_size", "2") == 2
    err = capsys.readouterr().err
    assert "filter_rules applies to instance models only" in err
    assert "pixel_size" not in err  # any model records the pixel size in its OME outputs


def test_class_rules_need_a_model_with_classes(oracle_folder, tmp_path, capsys):
    from tests.conftest import write_pairs

    data = write_pairs(tmp_path / "data", [(20, 20)])
    assert run("--model", oracle_folder, "--image_folder", data / "images", "--output_folder", tmp_path / "out",
               "--filter_rules", "class == debris") == 2
    assert "has no class per instance" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.tif"))
    (tmp_path / "classes").mkdir()
    assert run("--model", oracle_folder, "--image_folder", data / "images", "--output_folder", tmp_path / "out",
               "--mask_folder", data / "masks", "--class_mask_folder", tmp_path / "classes") == 2
    assert "class_mask_folder gives true classes, but" in capsys.readouterr().err


def test_stacks_are_refused_by_name(oracle_folder, tmp_path, capsys):
    write_image(tmp_path / "images" / "stack.tif", np.zeros((3, 20, 20, 3), np.float32))
    write_image(tmp_path / "images" / "plane.tif", np.zeros((20, 20, 3), np.float32))
    assert run("--model", oracle_folder, "--image_folder", tmp_path / "images", "--output_folder",
               tmp_path / "out") == 1
    assert "stack: image must be 2D for an instance model" in capsys.readouterr().err
    assert read_image(tmp_path / "out" / "plane.tif").max() == 0


@pytest.mark.parametrize("args, message", [
    (["--thresholds", "F=2"], "threshold F must be a number in [0, 1] or auto"),
    (["--thresholds", "F"], "each threshold must be NAME=VALUE"),
    (["--refinements", "grow 3"], "refinement must be one of"),
    (["--filter_rules", "size < 3"], "property must be one of"),
    (["--filter_rules", "nvoxels < 3"], "property must be one of label, npixels, area"),  # 3D only
    (["--pixel_size", "0"], "--pixel_size: must be a positive number"),
    (["--matching_thresholds", "0.5", "0"], "--matching_thresholds must be distinct IoU thresholds in (0, 1]"),
    (["--postprocess_overlap", "5000"], "--postprocess_overlap must be >= 0 and below --postprocess_window"),
])
def test_instance_flag_errors_exit_2(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--model", "m", "--image_folder", str(tmp_path), "--output_folder", "o", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_instance_flags_without_tensorflow():
    code = ("import sys, contextlib, io\nimport inference\nwith contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        inference.main(['--help'])\n    except SystemExit:\n        pass\n"
            "text = out.getvalue()\n"
            "assert all(f in text for f in ('--filter_rules', '--thresholds', '--save_intermediates', "
            "'--matching_thresholds', '--precision')), text\n"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"


# Library errors and small helpers


@pytest.mark.parametrize("change, message", [
    ({"pixel_size": 0.0}, "pixel_size must be a positive number"),
    ({"filter_rules": "npixels <"}, "filter_rules must be valid rules"),
    ({"refinements": ("dilation",)}, "refinement 'dilation' must be followed by one integer"),
    ({"thresholds": {"F": 1.5}}, "thresholds['F'] must be a number in [0, 1] or 'auto'"),
    ({"matching_thresholds": (0.5, 0.5)}, "matching_thresholds must be distinct IoU thresholds"),
    ({"postprocess_window": 64, "postprocess_overlap": 64}, "postprocess_overlap must be >= 0 and below "),
])
def test_inference_config_instance_errors(change, message, tmp_path):
    from lib.common.settings import ConfigError
    from lib.inference.runner import InferenceConfig

    config = InferenceConfig(model="m", image_folder=str(tmp_path), output_folder=str(tmp_path / "o"), **change)
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert message in str(info.value)


@pytest.mark.parametrize("postprocess, message", [
    ({"channels": ["F"]}, "instance.postprocess must hold valid post-processing settings"),
    ({**PostProcessConfig.default_for(("F", "Db")).to_dict()}, "must equal instance.channels"),
])
def test_bad_post_processing_in_model_json(postprocess, message):
    from lib.inference.instances_glue import postprocess_settings

    meta = instance_json()
    meta["instance"]["postprocess"] = postprocess
    with pytest.raises(ModelError, match=message):
        postprocess_settings(predictor_from_models([(oracle_model(), meta)]))


def test_post_processing_defaults_when_model_json_has_none():
    from lib.inference.instances_glue import postprocess_settings

    meta = instance_json()
    del meta["instance"]["postprocess"]
    config = postprocess_settings(predictor_from_models([(oracle_model(), meta)]), {"Db": "auto"}, ["fill_holes"])
    assert config.thresholds["Db"] == "auto" and config.refinements == ("fill_holes",)
    assert config.surface_channel == PostProcessConfig.default_for(CHANNELS).surface_channel


def test_semantic_only_functions_refuse_instance_models(tmp_path):
    from lib.inference.tiled import predict_to_tiff, predict_volume

    predictor = predictor_from_models([(oracle_model(), instance_json())])
    with pytest.raises(ValueError, match="predictor must be a semantic model to label a stack"):
        predict_volume(predictor, np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="predictor must be a semantic model to stream labels"):
        predict_to_tiff(predictor, np.zeros((8, 8, 3), np.float32), tmp_path / "x.tif")


def test_evaluate_instances_and_rows():
    from lib.scoring.reports import INSTANCE_METRIC_FIELDS, evaluate_instances, instance_metrics_rows

    truth = np.array([[1, 1, 0, 2], [1, 1, 0, 2]], np.uint16)
    labels = np.array([[3, 3, 0, 0], [3, 0, 0, 0]], np.uint16)
    matching, cm = evaluate_instances(labels, truth, (0.5, 0.9))
    assert cm.tolist() == [[2, 0], [3, 3]]  # rows: truth background/object; columns: prediction
    rows = instance_metrics_rows("x", matching.stats)
    assert [r["threshold"] for r in rows] == [0.5, 0.9] and list(rows[0]) == list(INSTANCE_METRIC_FIELDS)
    assert (rows[0]["tp"], rows[0]["fp"], rows[0]["fn"]) == (1, 0, 1)  # IoU 3/4 matches at 0.5
    assert (rows[1]["tp"], rows[1]["fn"]) == (0, 2)
    with pytest.raises(ValueError, match="mask size must equal the image size"):
        evaluate_instances(labels, truth[:, :3])


def test_binary_entropy_hand_computed():
    from lib.inference.tiled import binary_entropy

    maps = np.array([[[0.5, 0.9, 0.3], [1.0, 0.0, 0.7]]], np.float32)
    expected_first = (1.0 + -(0.9 * np.log2(0.9) + 0.1 * np.log2(0.1))) / 2
    entropy = binary_entropy(maps, [True, True, False])
    assert entropy.shape == (1, 2) and entropy[0, 0] == pytest.approx(expected_first, abs=1e-6)
    assert entropy[0, 1] == pytest.approx(0.0, abs=1e-4)
    assert not binary_entropy(maps, [False, False, False]).any()
