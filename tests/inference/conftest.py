"""Fixtures shared by the inference tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import unet_folder


@pytest.fixture(scope="module")
def oracle_folder(tmp_path_factory) -> Path:
    """A model folder of the "oracle" instance model (tests/inference/test_inference_instances.py): its
    F, C, Db maps are its input's channels, so the post-processing sees exactly the maps a test writes."""
    from tests.inference.test_inference_instances import instance_json, oracle_model

    folder = tmp_path_factory.mktemp("oracle") / "run"
    folder.mkdir()
    oracle_model().save(folder / "model.keras")
    (folder / "model.json").write_text(json.dumps(instance_json()))
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny 3-class UNet (depth 2) taking uint16 images (a module's own model_folder fixture wins)."""
    pytest.importorskip("keras")
    return unet_folder(tmp_path_factory.mktemp("model"), 3, "uint16", 30000.0, 17000.0, depth=2)
