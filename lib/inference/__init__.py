"""Model folder + images -> outputs: the predictor, the one tiled zone loop and its sinks, the
folder runner. Never imports lib.training."""
