"""TensorFlow SavedModel: exporting one in float32 (or bfloat16 when asked) and telling what one computes in.

A model trained under ``mixed_bfloat16`` exported as it is computes in bfloat16; the toolkit's
exports are float32 graphs unless asked otherwise (:func:`export_savedmodel`), and
:func:`graph_precision` reads the precision a SavedModel actually computes in from its graph
(so that ``inference.json`` records it, whoever exported the SavedModel).

Nothing here imports TensorFlow or Keras at import time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .keras_standard import standard_model

PRECISIONS = ("float32", "bfloat16")


def _graph_dtypes(function) -> set[str]:
    """Names of the dtypes appearing in the attributes of a concrete function's graph (and its library)."""
    import tensorflow as tf

    graph = function.graph.as_graph_def()
    found: set[str] = set()
    nodes = list(graph.node) + [node for f in graph.library.function for node in f.node_def]
    for node in nodes:
        for value in node.attr.values():
            if value.type:
                found.add(tf.dtypes.as_dtype(value.type).name)
            for listed in value.list.type:
                found.add(tf.dtypes.as_dtype(listed).name)
    return found


def graph_precision(layer) -> str | None:
    """"bfloat16", "float16" or "float32": what a ``keras.layers.TFSMLayer`` computes in; None for other objects.

    A graph with any bfloat16 (float16) tensor computes in bfloat16 (float16): a mixed-precision
    model keeps only its variables and outputs in float32.
    """
    function = getattr(layer, "call_endpoint_fn", None)
    if function is None or not hasattr(function, "graph"):
        return None
    dtypes = _graph_dtypes(function)
    for reduced in ("bfloat16", "float16"):
        if reduced in dtypes:
            return reduced
    return "float32"


def keras_precision(model) -> str:
    """"bfloat16", "float16" or "float32": the lowest compute dtype among a Keras model's layers."""
    dtypes = {getattr(layer, "compute_dtype", "float32") for layer in _all_layers(model)}
    for reduced in ("bfloat16", "float16"):
        if reduced in dtypes:
            return reduced
    return "float32"


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def computed_precision(model) -> str:
    """What ``model`` (a Keras model or a SavedModel layer) computes in."""
    return graph_precision(model) or keras_precision(model)


def in_precision(model, precision: str = "float32"):
    """A Keras model computing in ``precision`` with Keras' own layers (logits head float32 either way)."""
    import keras

    model = standard_model(model)
    if precision == "float32":
        return model
    config = model.get_config()
    outputs = config["output_layers"]
    outputs = [outputs] if outputs and isinstance(outputs[0], str) else outputs
    heads = {entry[0] for entry in outputs}
    for layer in config["layers"]:
        inner = layer.get("config", {})
        if layer.get("class_name") != "InputLayer" and inner.get("name") not in heads \
                and isinstance(inner.get("dtype"), dict):
            inner["dtype"]["config"]["name"] = "mixed_bfloat16"
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


OUTPUT_KEY = "logits"


def write_savedmodel(model, path: Path) -> None:
    """Write ``model`` as a SavedModel folder ``path``: endpoints ``serve`` and ``serving_default`` both take
    ``image`` (B, H, W, C) float32 and return ``{"logits": (B, H, W, K) float32}``.

    A dict, not the bare tensor of ``model.export``: bioimage.io's TensorFlow 2 runner
    (bioimageio.core 0.11) calls the ``serve`` endpoint and requires a dict of outputs.
    """
    import keras
    import tensorflow as tf

    channels = int(model.inputs[0].shape[-1])
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serve", fn=lambda image: {OUTPUT_KEY: model(image, training=False)},
                         input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name="image")])
    archive.write_out(str(path), verbose=False)


def export_savedmodel(model, output: Path, precision: str = "float32") -> Path:
    """Write ``model`` as a TF SavedModel folder at ``output`` (replaced whole; a temporary folder beside first).

    The graph has Keras' own layers and computes in ``precision``; its ``serving_default``
    signature takes ``image`` (B, H, W, C) float32 normalised and returns float32 logits.
    """
    output = Path(output)
    tmp = output.with_name(f".{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_savedmodel(in_precision(model, precision), tmp)
        old = output.with_name(f".{output.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if output.exists():
            output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
