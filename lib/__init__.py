"""Segmentation toolkit for microscopy: the library behind the command-line scripts.

Nothing heavy is imported here: TensorFlow is imported only by the modules that need it,
so that data preparation and ``--help`` stay instant.
"""

__version__ = "0.1.0"
