"""Training with --number_classes above the classes of the database: a warning, not silence."""

from __future__ import annotations

from lib.store.lmdb_store import LmdbReader
from lib.training.config import TrainConfig
from lib.training.inputs import check_databases, class_warnings
from tests.conftest import tiny_database


def _config(db, classes):
    return TrainConfig(train_database=str(db / "train-t.lmdb"), test_database=str(db / "test-t.lmdb"),
                       output_dir="unused", number_classes=classes, model_options={"base_filters": 4, "depth": 1})


def test_more_classes_than_the_database_holds_is_warned_about(tmp_path):
    db = tiny_database(tmp_path)
    with LmdbReader(db / "train-t.lmdb") as reader:
        held = reader.metadata["number_classes"]
    logged = []
    check_databases(_config(db, held + 2), log=logged.append)
    assert len(logged) == 1 and logged[0].startswith(f"warning: --number_classes {held + 2} is more than the {held} "
                                                      "classes of")
    assert f"Pass --number_classes {held}" in logged[0]
    logged.clear()
    check_databases(_config(db, held), log=logged.append)
    assert logged == []


def test_class_warnings_only_for_semantic_runs():
    meta = {"number_classes": 2, "class_pixel_counts": [10, 5]}
    assert class_warnings(_config_plain(3), meta)
    assert not class_warnings(_config_plain(2), meta)
    assert not class_warnings(TrainConfig(train_database="a", test_database="b", output_dir="c", target="instance"),
                              meta)


def test_percentile_settings_are_validated_with_the_rest():
    from lib.common.settings import ConfigError

    config = TrainConfig(train_database="a", test_database="b", output_dir="c", number_classes=2,
                         normalization="percentile", percentiles=[5, 5])
    try:
        config.validate()
    except ConfigError as error:
        assert any("percentiles must satisfy 0 <= LOW < HIGH <= 100; got 5 5" in v for v in error.violations)
    else:
        raise AssertionError("percentiles 5 5 were accepted")
    assert config.percentiles == (5, 5)  # a list from JSON becomes a tuple


def _config_plain(classes):
    return TrainConfig(train_database="a", test_database="b", output_dir="c", number_classes=classes)
