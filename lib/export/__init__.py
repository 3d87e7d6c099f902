"""Exports of a model folder for other tools: standard-layer Keras, SavedModel, bioimage.io, ONNX, model card.

Modules (imported one by one; this file imports none of them, so that :mod:`lib.model_folder`
can use :mod:`.keras_standard`, :mod:`.savedmodel` and :mod:`.package_reader` without a cycle):

- :mod:`.keras_standard`: the toolkit's speed layers swapped for Keras' own (and back), float32 graphs.
- :mod:`.savedmodel`: TF SavedModel export and the precision a SavedModel computes in.
- :mod:`.bioimageio`: a bioimage.io model package (spec 0.5).
- :mod:`.onnx_export`: ONNX through tf2onnx, checked with onnxruntime.
- :mod:`.model_card`: ``model_card.md`` and the cover picture.
- :mod:`.package_reader`: a package this toolkit wrote, read back for ``inference.py --model m.zip``.
- :mod:`.commands`: what ``export_model.py`` does.
"""
