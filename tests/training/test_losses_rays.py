"""The StarDist polygon-distance loss of ray planes, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lib.training.losses import instance_activations, make_instance_loss


def test_ray_loss_is_the_error_on_object_pixels():
    # one example, 2 x 2 pixels; planes: F (binary), two rays; the instance ids ride along last
    targets = np.zeros((1, 2, 2, 4), np.float32)
    targets[0, 0, :, 0] = 1.0               # F: the top row is the object
    targets[0, 0, :, 1] = [0.2, 0.4]        # ray 0 on the object
    targets[0, 0, :, 2] = [0.6, 0.1]        # ray 1
    targets[0, 0, :, 3] = 5.0               # ids
    logits = np.zeros((1, 2, 2, 3), np.float32)
    logits[0, :, :, 1] = 0.5                # off by 0.3, 0.1 on the object; 0.5 on background (ignored)
    logits[0, :, :, 2] = [[0.6, 0.3], [9.0, 9.0]]
    loss = make_instance_loss(("binary", "ray", "ray"), (1.0, 2.0, 1.0), "l1")(targets, logits).numpy()
    assert loss.shape == (1, 3)
    assert loss[0, 1] == pytest.approx(2.0 * (0.3 + 0.1) / 2)
    assert loss[0, 2] == pytest.approx(1.0 * (0.0 + 0.2) / 2)
    bce = np.log(2.0)  # logit 0 against 0 or 1
    assert loss[0, 0] == pytest.approx(bce, rel=1e-5)
    mse = make_instance_loss(("binary", "ray", "ray"), (1.0, 1.0, 1.0), "mse")(targets, logits).numpy()
    assert mse[0, 1] == pytest.approx((0.09 + 0.01) / 2)
    # no object pixel: the ray loss is 0, not a division by zero
    assert make_instance_loss(("ray",), (1.0,))(np.zeros((1, 2, 2, 1), np.float32),
                                                np.ones((1, 2, 2, 1), np.float32)).numpy()[0, 0] == 0.0


def test_ray_maps_are_clipped_like_distances():
    logits = np.array([[[[-1.0, -1.0, 1.5]]]], np.float32)
    maps = instance_activations(("binary", "ray", "ray"))(logits).numpy()
    np.testing.assert_allclose(maps[0, 0, 0], [1 / (1 + np.e), 0.0, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="channel kinds must be one of binary, distance, ray"):
        make_instance_loss(("sigmoid",), (1.0,))
