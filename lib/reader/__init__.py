"""LMDB databases -> training batches: augmentation, instance targets, worker processes writing
whole batches into shared memory. Never imports TensorFlow at module level."""
