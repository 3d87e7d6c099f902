"""Refinements of issue 17 on hand-made cases: Voronoi restricted to a mask, large-blob repair."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lib.instances.postprocess import PostProcessConfig, postprocess, refine
from lib.instances.refine import repair_blobs, voronoi


def test_voronoi_gives_each_mask_pixel_to_the_nearest_instance():
    labels = np.zeros((5, 9), np.int32)
    labels[2, 1] = 1
    labels[2, 7] = 2
    mask = np.zeros((5, 9), bool)
    mask[1:4, :] = True
    out = voronoi(labels, mask)
    np.testing.assert_array_equal(out[2], [1, 1, 1, 1, 1, 2, 2, 2, 2])  # column 4 equidistant: the first
    assert not out[0].any() and not out[4].any()  # outside the mask
    np.testing.assert_array_equal(out[1, :4], [1, 1, 1, 1])
    whole = refine(labels, ["voronoi"])  # without a mask: the whole image
    assert whole.all() and whole[0, 0] == 1 and whole[4, 8] == 2
    assert not voronoi(np.zeros((3, 3), np.int32), None).any()


def test_voronoi_in_postprocess_fills_the_growth_mask():
    # F is high on two 6 x 6 squares; P seeds only their centres and grows into F by the
    # watershed anyway, so the refinement must not change a perfect result...
    truth = np.zeros((10, 16), np.int32)
    truth[2:8, 1:7] = 1
    truth[2:8, 8:14] = 2
    maps = np.stack([(truth > 0).astype(np.float32), np.zeros(truth.shape, np.float32)], -1)
    maps[4:6, 3:5, 1] = 1.0
    maps[4:6, 10:12, 1] = 1.0
    base = PostProcessConfig.default_for(("F", "P"))
    config = dataclasses.replace(base, refinements=("voronoi",), min_seed_size=1)
    labels = postprocess(maps, config)
    np.testing.assert_array_equal(labels, truth)
    # ... but pixels of the mask that no flood reaches (cut off from every seed) are shared out
    maps[2:8, 7, 0] = 0.0  # a gap column: still background
    maps[2, 1, 0] = 1.0
    labels = postprocess(maps, config)
    assert labels[2, 1] == 1 and not labels[:, 7].any()


def test_repair_blobs_merges_fragments_and_fills_holes():
    labels = np.zeros((12, 16), np.int32)
    labels[1:11, 1:11] = 1          # the blob: 100 px
    labels[4:7, 4:7] = 0            # a central hole
    labels[1:3, 8:11] = 2           # a fragment inside the blob's corner: more than half its edge on the blob
    labels[9:11, 1:3] = 3           # another one
    labels[4:7, 11:14] = 4          # a neighbour: a quarter of its edge on the blob
    out = repair_blobs(labels, 60)
    assert set(np.unique(out)) == {0, 1, 4}
    assert (out[1:11, 1:11] == 1).all()  # fragments merged, hole filled
    assert (out[4:7, 11:14] == 4).all()
    # no instance above the size: nothing changes
    np.testing.assert_array_equal(repair_blobs(labels, 200), labels)


def test_repair_blobs_keeps_a_hole_holding_another_object():
    labels = np.zeros((9, 9), np.int32)
    labels[1:8, 1:8] = 1
    labels[3:6, 3:6] = 0
    labels[4, 4] = 2  # an object inside the hole, touching only background: the hole is not all background
    out = refine(labels, ["repair_blobs 20"])
    assert out[4, 4] == 2 and out[3, 3] == 0


@pytest.mark.parametrize("step, message", [("repair_blobs", "must be followed by one integer"),
                                           ("voronoi 3", "must have no argument")])
def test_refinement_arguments_are_checked(step, message):
    with pytest.raises(ValueError, match=message):
        refine(np.zeros((3, 3), np.int32), [step])
