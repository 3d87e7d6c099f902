"""The toolkit's speed layers swapped for Keras' own, and back; float32 graphs.

A model built by :mod:`lib.models` holds two layers of ours (:mod:`lib.models.layers`):
``FusedBatchNormalization`` and ``FastDropout``. A ``.keras`` file holding them loads only
where ``lib.models`` is imported. :func:`standard_model` rebuilds a model with
``keras.layers.BatchNormalization`` and ``keras.layers.Dropout`` in their place (same
configuration: axis, momentum, epsilon, centre/scale, rate, seed; same weights and moving
statistics, in the same order) and every layer computing in float32 (a model trained under
``mixed_bfloat16`` is saved with bfloat16 layers otherwise), so that
``keras.saving.load_model(path)`` works in safe mode in a Python that has only keras and
tensorflow. :func:`save_standard` writes such a file without rebuilding the model (it edits the
archive), and :func:`fast_model` / :func:`swap_layers` with :data:`TO_FAST` do the reverse (the
predictor does it for bfloat16, where our batch normalisation is 1.8x faster on a CPU).

Nothing here imports :mod:`lib.model_folder` (which imports this module) nor Keras at import time.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

# Our layer -> the Keras layer it subclasses (same get_config, same variables in the same order).
TO_STANDARD = {"FusedBatchNormalization": "BatchNormalization", "FastDropout": "Dropout"}
TO_FAST = {standard: fast for fast, standard in TO_STANDARD.items()}
_REGISTERED_PACKAGE = "segmentation"  # lib.models.layers registers its layers as segmentation>Name
_NON_FLOAT_POLICIES = (None, "float64", "int32", "int64", "bool")
WEIGHTS = "model.weights.h5"  # inside a .keras archive


class NotStandard(ValueError):
    """A model that still holds a layer Keras alone cannot load (names it)."""


def _policy_name(layer_config: dict) -> str | None:
    dtype = layer_config.get("dtype")
    if isinstance(dtype, dict):
        return dtype.get("config", {}).get("name")
    return dtype if isinstance(dtype, str) else None


def _float32_policy() -> dict:
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": None}


def swap_layers(config: dict, mapping: dict[str, str], float32: bool) -> int:
    """Swap layer classes of a functional ``config`` (nested models too) by ``mapping``, in place.

    ``float32``: also set every layer with a float policy (``mixed_bfloat16``, ``bfloat16``, ...)
    to ``float32``. Returns how many layers changed class or policy.
    """
    changed = 0
    for layer in config.get("layers", []):
        inner = layer.get("config", {})
        if "layers" in inner:
            changed += swap_layers(inner, mapping, float32)
        name = layer.get("class_name")
        if name in mapping:
            target = mapping[name]
            layer["class_name"] = target
            if target in TO_STANDARD:  # back to ours: found through the registration of lib.models.layers
                layer["module"] = "lib.models.layers"
                layer["registered_name"] = f"{_REGISTERED_PACKAGE}>{target}"
            else:
                layer["module"] = "keras.layers"
                layer["registered_name"] = None
            changed += 1
        if float32 and name != "InputLayer" and _policy_name(inner) not in _NON_FLOAT_POLICIES \
                and _policy_name(inner) != "float32":
            inner["dtype"] = _float32_policy()
            changed += 1
    return changed


def custom_classes(config: Any) -> list[str]:
    """Class names in a serialised Keras ``config`` that Keras alone does not know (registered ones)."""
    found: list[str] = []
    if isinstance(config, dict):
        registered = config.get("registered_name")
        if isinstance(registered, str) and ">" in registered:
            found.append(registered)
        module = config.get("module")
        if isinstance(module, str) and module.startswith("lib."):
            found.append(f"{module}.{config.get('class_name')}")
        for value in config.values():
            found.extend(custom_classes(value))
    elif isinstance(config, list):
        for value in config:
            found.extend(custom_classes(value))
    return sorted(set(found))


def _rebuild(model, config: dict):
    import keras

    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def standard_model(model):
    """``model`` with Keras' own layers in place of ours, computing in float32 (the same model when it is already).

    Raises :class:`NotStandard` naming any layer class that Keras alone would still not know.
    """
    config = copy.deepcopy(model.get_config())
    changed = swap_layers(config, TO_STANDARD, float32=True)
    left = custom_classes(config)
    if left:
        raise NotStandard(f"model layers must all be Keras' own for a standard export; got {', '.join(left)} "
                          f"in {model.name}")
    return _rebuild(model, config) if changed else model


def fast_model(model):
    """``model`` with our speed layers in place of Keras' BatchNormalization and Dropout (same weights).

    Used when the toolkit loads a standard ``model.keras``: at inference in bfloat16 Keras'
    batch normalisation upcasts to float32 and back; ours is one multiply-add in the input's dtype.
    Returns ``model`` itself when it holds neither layer.
    """
    config = copy.deepcopy(model.get_config())
    return _rebuild(model, config) if swap_layers(config, TO_FAST, float32=False) else model


def snake_case(name: str) -> str:
    """Keras' name for a layer class in a weights file (``Conv2DTranspose`` -> ``conv2d_transpose``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _weight_groups(class_names: list[str]) -> list[str]:
    """The groups ``layers/<name>`` Keras 3 gives the layers of a flat functional model in its weights file:
    the class name in snake case, numbered ``_1, _2, ...`` from its second occurrence, in layer order."""
    seen: dict[str, int] = {}
    groups = []
    for class_name in class_names:
        name = snake_case(class_name)
        seen[name] = seen.get(name, -1) + 1
        groups.append(name if seen[name] == 0 else f"{name}_{seen[name]}")
    return groups


def _rewrite(source: Path, target: Path) -> bool:
    """Write ``target``: the ``.keras`` file ``source`` with our layers swapped for Keras' own, in float32.

    Only the archive is edited: ``config.json`` (class names and dtype policies) and the group
    names of the weights file (Keras names them by class). Returns False, writing nothing, when
    the file is not laid out as expected (a nested model, another Keras layout); the caller then
    rebuilds the model instead.
    """
    import h5py

    with zipfile.ZipFile(source) as archive:
        config = json.loads(archive.read("config.json"))
        members = [info.filename for info in archive.infolist()]
        inner = config.get("config", {})
        layers = inner.get("layers", [])
        if WEIGHTS not in members or any("layers" in layer.get("config", {}) for layer in layers):
            return False
        old = _weight_groups([layer["class_name"] for layer in layers])
        swap_layers(inner, TO_STANDARD, float32=True)
        new = _weight_groups([layer["class_name"] for layer in layers])
        if custom_classes(config.get("config", {})):
            return False
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".keras-rewrite-") as scratch:
            weights = Path(archive.extract(WEIGHTS, scratch))
            with h5py.File(weights, "r+") as h5:
                if "layers" not in h5 or set(h5["layers"].keys()) != set(old):
                    return False
                moves = [(a, b) for a, b in zip(old, new) if a != b]
                for index, (a, _) in enumerate(moves):  # two steps: a new name may be another layer's old one
                    h5.move(f"layers/{a}", f"layers/.swap{index}")
                for index, (_, b) in enumerate(moves):
                    h5.move(f"layers/.swap{index}", f"layers/{b}")
            with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
                for name in members:
                    if name == "config.json":
                        out.writestr(name, json.dumps(config))
                    elif name == WEIGHTS:
                        out.write(weights, name)
                    else:
                        out.writestr(name, archive.read(name))
    return True


def save_standard(model, path) -> None:
    """Save ``model`` as a ``.keras`` file at ``path`` with Keras' own layers, in float32.

    Saved as it is, then the archive is rewritten (:func:`_rewrite`: no model is rebuilt, which
    would cost as much as building it); a model the rewrite does not handle is rebuilt with
    :func:`standard_model` and saved.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".keras-save-") as scratch:
        saved = Path(scratch) / "model.keras"
        model.save(saved)
        if _rewrite(saved, path):
            return
    standard_model(model).save(path)
