"""Several experts' masks -> one estimated ground truth (STAPLE, majority vote). Never imports
TensorFlow."""
