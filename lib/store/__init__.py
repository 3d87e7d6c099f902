"""Folders of images and masks -> tiled LMDB databases: reading and pairing files, all tile
geometry, the record format, the build. Never imports TensorFlow or the reader."""
