"""ONNX export through tf2onnx, checked with onnxruntime against Keras on a sample.

tf2onnx and onnxruntime are optional dependencies (requirements-dev.txt pins them): without
them, or when the converter fails on a layer, or when onnxruntime does not reproduce the Keras
logits within :data:`TOLERANCE`, :func:`convert_checked` raises :class:`OnnxUnavailable` saying
which, and no file is written.

The graph takes ``image`` (B, H, W, C) float32, normalised as in training, with H and W
multiples of the size divisor, and returns float32 logits (B, H, W, K), like ``model.keras``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..common.files import write_bytes
from .model_card import ExportError

OPSET = 17
# Largest absolute difference allowed between ONNX and Keras logits (float32, same graph).
TOLERANCE = 1e-3


class OnnxUnavailable(ExportError):
    """ONNX cannot be written here (a missing converter, a layer it cannot convert, outputs that differ)."""


def _converter():
    try:
        import onnxruntime
        import tf2onnx
    except ImportError as exc:
        raise OnnxUnavailable(f"ONNX export must have tf2onnx and onnxruntime installed; got {exc}. Install them "
                              "with `pip install -r requirements-dev.txt`") from None
    return tf2onnx, onnxruntime


def convert_checked(model, sample: np.ndarray, opset: int = OPSET) -> tuple[bytes, int]:
    """The ONNX bytes of the Keras ``model`` (float32) and the opset, after onnxruntime reproduced it on ``sample``.

    ``sample``: a normalised float32 batch (B, H, W, C). Raises :class:`OnnxUnavailable`.
    """
    import tensorflow as tf

    tf2onnx, onnxruntime = _converter()
    channels = int(model.inputs[0].shape[-1])
    spec = [tf.TensorSpec([None, None, None, channels], tf.float32, name="image")]
    function = tf.function(lambda x: model(x, training=False), input_signature=spec)
    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
    except Exception as exc:  # the converter raises many types for an op it does not handle
        raise OnnxUnavailable(f"ONNX conversion must succeed; tf2onnx failed with {type(exc).__name__}: "
                              f"{str(exc)[:300]}. Use --format savedmodel or the keras weights instead") from None
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: np.asarray(sample, np.float32)})[0]
    expected = np.asarray(model(sample, training=False), np.float32)
    difference = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
    if not difference <= TOLERANCE:
        raise OnnxUnavailable(f"ONNX outputs must equal the Keras logits within {TOLERANCE}; got a largest "
                              f"difference of {difference:.3g} (shapes {got.shape} and {expected.shape}), so no "
                              "ONNX file is written")
    return data, opset


def export_onnx(model, sample: np.ndarray, output: str | os.PathLike) -> tuple[Path, int]:
    """Write the checked ONNX file of ``model`` at ``output`` (atomic); return it and its opset."""
    data, opset = convert_checked(model, sample)
    return write_bytes(Path(output), data), opset
