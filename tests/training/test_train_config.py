"""TrainConfig holds every default: the command lines only map flags onto it; exit codes by class."""

from __future__ import annotations

import dataclasses
import signal

import pytest

import train_fcn
import train_unet
from lib.common.errors import EXIT_BAD_INPUT, EXIT_RESUMABLE, EXIT_SOME_FAILED
from lib.training.config import INSTANCE_UNET_FILTERS, TrainConfig, TrainingDiverged, TrainingInterrupted

REQUIRED = ["--train_database", "a.lmdb", "--test_database", "b.lmdb", "--output_dir", "out"]


def _cli_config(module, extra: list[str]) -> TrainConfig:
    if module is train_fcn:
        parser = train_unet.build_parser("train_fcn.py", "", train_fcn.ARCHITECTURES, "fcn8", "--variant")
    else:
        parser = train_unet.build_parser("train_unet.py", "", train_unet.ARCHITECTURES, "unet", "--architecture")
    return train_unet.config_from_args(parser.parse_args(REQUIRED + extra), parser, module.ARCHITECTURES)


@pytest.mark.parametrize("module, extra, python", [
    (train_unet, ["--number_classes", "3"], dict(number_classes=3)),
    (train_unet, ["--target", "instance"], dict(target="instance")),
    (train_unet, ["--target", "instance", "--architecture", "fc-densenet56"],
     dict(target="instance", architecture="fc-densenet56")),
    (train_unet, ["--number_classes", "2", "--folds", "3"], dict(number_classes=2, folds=3)),
    (train_fcn, ["--number_classes", "2"], dict(number_classes=2, architecture="fcn8")),
    (train_fcn, ["--target", "instance"], dict(target="instance", architecture="fcn8")),
])
def test_cli_defaults_equal_the_python_defaults(module, extra, python):
    from_cli = _cli_config(module, extra)
    from_python = TrainConfig(train_database="a.lmdb", test_database="b.lmdb", output_dir="out", **python)
    assert from_cli == from_python
    assert from_cli.to_dict() == from_python.to_dict()


def test_defaults_that_depend_on_other_settings_are_resolved_by_the_config():
    instance = TrainConfig("a", "b", "o", target="instance")
    assert instance.number_classes == 2 and instance.model_options == {"base_filters": INSTANCE_UNET_FILTERS}
    assert TrainConfig("a", "b", "o", target="instance", model_options={"depth": 3}).model_options == {
        "depth": 3, "base_filters": INSTANCE_UNET_FILTERS}
    assert TrainConfig("a", "b", "o", target="instance", model_options={"base_filters": 8}).model_options == {
        "base_filters": 8}
    assert TrainConfig("a", "b", "o", 2, target="instance", architecture="fcn8").model_options == {}
    assert TrainConfig("a", "b", "o", 2).model_options == {}
    assert TrainConfig("a", "b", "o", 2, folds=3).fold == 0
    # Partial augmentation and instance settings are completed with the defaults.
    partial = TrainConfig("a", "b", "o", 2, augmentation={"rotation": False}, instance_options={"touch_width": 4})
    assert partial.augmentation == {**TrainConfig("a", "b", "o", 2).augmentation, "rotation": False}
    assert partial.instance_options["touch_width"] == 4 and partial.instance_options["contour_mode"] == "thick"
    # Resolution is idempotent: replace() gives an equal config.
    assert dataclasses.replace(instance) == instance


def test_semantic_python_config_needs_number_classes():
    from lib.common.settings import ConfigError

    with pytest.raises(ConfigError, match="number_classes must be given for target 'semantic'"):
        TrainConfig("a", "b", "o").validate()


# Exit codes, by class


def test_bad_settings_exit_2(tmp_path, capsys):
    code = train_unet.main(["--train_database", str(tmp_path / "none.lmdb"), "--test_database",
                            str(tmp_path / "none.lmdb"), "--output_dir", str(tmp_path / "out"), "--number_classes", "2"])
    assert code == EXIT_BAD_INPUT
    assert "the databases cannot be used" in capsys.readouterr().err


@pytest.mark.parametrize("error, code", [
    (TrainingInterrupted(signal.SIGTERM, 12), EXIT_RESUMABLE),
    (TrainingDiverged("the training loss became nan at step 3 (a message with 'step' in it)"), EXIT_SOME_FAILED),
])
def test_errors_exit_by_class(monkeypatch, tmp_path, capsys, error, code):
    import lib.training

    def fake_train(config, log=print):
        raise error

    monkeypatch.setattr(lib.training, "train", fake_train)
    assert train_unet.main(REQUIRED[:-1] + [str(tmp_path / "out"), "--number_classes", "2"]) == code
    assert str(error) in capsys.readouterr().err


def test_an_unexpected_exception_is_not_reported_as_bad_settings(monkeypatch, tmp_path):
    import lib.training

    def broken_train(config, log=print):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(lib.training, "train", broken_train)
    with pytest.raises(ZeroDivisionError, match="a bug"):  # traceback kept; Python exits 1
        train_fcn.main(REQUIRED[:-1] + [str(tmp_path / "out"), "--number_classes", "2"])


def test_lib_training_and_reader_import_no_tensorflow_and_no_argparse():
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import ROOT

    script = ("import sys; import lib.reader.imagereader, lib.reader.batches, lib.reader.samples, lib.training, "
              "lib.model_folder; print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    sources = [*Path(ROOT, "lib/training").glob("*.py"), *Path(ROOT, "lib/reader").glob("*.py"),
               Path(ROOT, "lib/model_folder.py")]
    assert not [str(p) for p in sources if "import argparse" in p.read_text()]


def test_representation_options_reach_the_config():
    config = _cli_config(train_unet, ["--target", "instance", "--instance_channels", "F,R", "--n_rays", "16",
                                      "--ray_grid", "1", "--d_alpha", "3", "--d_beta", "4", "--dn_scale", "7"])
    options = config.instance_options
    assert (options["n_rays"], options["ray_grid"], options["d_alpha"], options["d_beta"], options["dn_scale"]) == \
        (16, 1, 3.0, 4.0, 7.0)
    assert sum(name.startswith("R") for name in config.target_spec().channels) == 16


def test_representation_options_without_their_channel_are_warned_about(capsys):
    _cli_config(train_unet, ["--target", "instance", "--instance_channels", "F,R", "--n_rays", "16"])
    assert "warning" not in capsys.readouterr().err
    _cli_config(train_unet, ["--target", "instance", "--n_rays", "16", "--dn_scale", "7"])
    err = capsys.readouterr().err
    assert "warning: --n_rays 16 changes nothing: --instance_channels F,C,Db has no channel it applies to" in err
    assert "--dn_scale 7.0 changes nothing" in err
    _cli_config(train_unet, ["--number_classes", "2", "--d_alpha", "3"])
    assert "--d_alpha 3.0 changes nothing: it applies to --target instance only" in capsys.readouterr().err


def test_settings_added_after_a_run_was_recorded_count_as_their_defaults():
    from lib.training.run import differing_settings, recorded_settings

    config = TrainConfig(train_database="a.lmdb", test_database="b.lmdb", output_dir="out", target="instance")
    now = recorded_settings(config)
    older = {k: v for k, v in now.items() if k not in ("percentiles", "collective_timeout")}
    older["instance_options"] = {k: v for k, v in now["instance_options"].items() if k not in ("n_rays", "d_alpha")}
    assert differing_settings(older, now) == []
    older["normalization"] = "dataset"  # recorded before percentile became the default: a real difference
    assert differing_settings(older, now) == ["normalization"]


def test_jit_compile_is_refused_for_embeddings(capsys):
    with pytest.raises(SystemExit) as stop:
        _cli_config(train_unet, ["--target", "instance", "--instance_channels", "E", "--jit_compile"])
    assert stop.value.code == 2
    assert "jit_compile must be off for the E channels" in capsys.readouterr().err
    _cli_config(train_unet, ["--target", "instance", "--instance_channels", "F,C,Db", "--jit_compile"])

