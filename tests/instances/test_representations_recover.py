"""Perfect targets of every representation of issue 17 give the instances back through the default
post-processing (lib.instances.postprocess.PostProcessConfig.default_for), and the StarDist
polygons are rasterised to the objects' areas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from lib.instances.postprocess import PostProcessConfig, postprocess
from lib.instances.stardist import polygon_instances
from lib.reader.targets import make_targets, parse_instance_channels
from lib.scoring.metrics import match_instances, pool_stats

NIST = Path("/work/shared/data/nist_phase_contrast/masks")
# (Long-range affinities A,A0_3,A3_0 reach 0.985 on these cells: seeds are 3 px inside every edge.)
REPRESENTATIONS = ("F,C,Db", "F,R", "F,H,V", "F,D", "F,Dc", "F,Dn", "Db,B", "A", "A0_1,A1_0,A0_2,A2_0", "E")


def convex_cells(seed: int, shape=(128, 128), spacing: int = 16, radius: float = 9.0) -> np.ndarray:
    """Dense touching convex cells: jittered grid centres, each pixel to its nearest centre within
    ``radius`` (a Voronoi cell cut by a disk: convex, so star-convex from every inner pixel)."""
    rng = np.random.default_rng(seed)
    cy, cx = np.meshgrid(np.arange(spacing // 2, shape[0], spacing), np.arange(spacing // 2, shape[1], spacing),
                         indexing="ij")
    centres = np.stack([cy.ravel(), cx.ravel()], 1) + rng.uniform(-3, 3, (cy.size, 2))
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    d2 = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    nearest = d2.argmin(-1)
    return np.where(d2.min(-1) <= radius ** 2, nearest + 1, 0).astype(np.int32)


def without_small(labels: np.ndarray, min_size: int = 30) -> np.ndarray:
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def f1(truths, representation: str) -> float:
    spec = parse_instance_channels(representation, ray_grid=1)
    config = PostProcessConfig.default_for(spec.channels)
    matchings = [match_instances(t.astype(np.int64), postprocess(make_targets(t, spec), config).astype(np.int64),
                                 thresholds=(0.5,)) for t in truths]
    return pool_stats(matchings)[0.5].f1


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_convex_touching_cells_come_back(representation):
    truths = [convex_cells(seed) for seed in (0, 1)]
    assert f1(truths, representation) >= 0.99


# Generated cells (data/generate.py) overlap and are painted over one another: some are split in
# two pieces or are not star-convex, which no bottom-up representation recovers whole from
# perfect maps (F,C,Db, today's default, reaches 0.96). Measured F1 at IoU 0.5 on three dense
# 256 x 256 images, objects under 30 px dropped (seed 1): F,C,Db 0.962, F,R 0.936, F,H,V 0.80,
# F,D 0.950, F,Dc 0.917, F,Dn 0.886, Db,B 0.962, A 0.957, E 0.972 (its clusters need no
# connectivity). The bounds below sit under those.
GENERATED_BOUNDS = {"F,C,Db": 0.94, "F,R": 0.9, "F,H,V": 0.7, "F,D": 0.92, "F,Dc": 0.88, "F,Dn": 0.84,
                    "Db,B": 0.94, "A": 0.93, "E": 0.95}


@pytest.fixture(scope="module")
def generated_cells():
    from data.generate import synthesize

    rng = np.random.default_rng(1)
    return [without_small(synthesize(rng, 256, 256)[1].astype(np.int32)) for _ in range(2)]


@pytest.mark.parametrize("representation", sorted(GENERATED_BOUNDS))
def test_generated_cells_come_back(generated_cells, representation):
    assert f1(generated_cells, representation) >= GENERATED_BOUNDS[representation]


@pytest.mark.skipif(not NIST.is_dir(), reason="NIST phase-contrast masks not available")
@pytest.mark.parametrize("representation, n_masks", [("F,C,Db", 3), ("F,R", 1), ("F,H,V", 3), ("F,D", 3),
                                                     ("A", 3), ("E", 3)])
def test_nist_objects_come_back(representation, n_masks):
    # The expert masks split into connected components (objects of >= 30 px). F,R on one mask only:
    # its clumps are far from star-convex, and the suppression rasterises many large polygons (3 s).
    from lib.store.images import read_mask

    names = sorted(NIST.glob("*.tif"))[:n_masks]
    truths = [without_small(ndi.label(read_mask(p, binary_255=False) > 0)[0].astype(np.int32)) for p in names]
    assert all(t.max() > 0 for t in truths)
    assert f1(truths, representation) >= 0.99


def test_polygons_are_rasterised_to_the_objects_areas():
    # A disc of radius 12 and an axis-aligned 15 x 15 square: one polygon each, of the right area.
    labels = np.zeros((64, 96), np.int32)
    yy, xx = np.mgrid[:64, :96]
    labels[(yy - 30) ** 2 + (xx - 30) ** 2 <= 144] = 1
    labels[20:35, 60:75] = 2
    spec = parse_instance_channels("F,R", ray_grid=1)
    maps = make_targets(labels, spec)
    out, centres = polygon_instances(maps[..., 0], maps[..., 1:])
    assert len(centres) == 2 and out.max() == 2
    for true_id in (1, 2):
        found = np.bincount(out[labels == true_id]).argmax()
        area, true_area = np.count_nonzero(out == found), np.count_nonzero(labels == true_id)
        assert abs(area - true_area) <= 0.03 * true_area
    assert {tuple(c) for c in centres} == {(30, 30), (27, 67)}
    square = out == np.bincount(out[labels == 2]).argmax()
    np.testing.assert_array_equal(square, labels == 2)  # axis rays end on the square's edges


def test_polygon_nms_keeps_the_best_of_overlapping_candidates():
    # Two candidates whose polygons overlap at IoU > 0.4: only the higher-scored one stays.
    h, w, n = 40, 40, 16
    probability = np.zeros((h, w), np.float32)
    rays = np.zeros((h, w, n), np.float32)
    probability[20, 18], probability[20, 21] = 0.9, 0.8
    rays[20, 18] = rays[20, 21] = 8 / (8 + 16)  # 8 px in every direction
    labels, centres = polygon_instances(probability, rays, 0.5, 0.4)
    assert centres.tolist() == [[20, 18]] and labels.max() == 1
    # Far apart, both stay.
    probability[20, 21], probability[5, 5] = 0.0, 0.8
    rays[5, 5] = 3 / (3 + 16)
    labels, centres = polygon_instances(probability, rays, 0.5, 0.4)
    assert centres.tolist() == [[20, 18], [5, 5]] and labels.max() == 2
    # Below the probability threshold: nothing.
    assert polygon_instances(probability * 0.5, rays, 0.5, 0.4)[0].max() == 0


def test_inference_threshold_override_sets_the_polygon_suppression():
    from types import SimpleNamespace

    from lib.common.settings import ConfigError
    from lib.inference.instances_glue import parse_thresholds, postprocess_settings

    channels = parse_instance_channels("F,R", n_rays=8).channels
    info = SimpleNamespace(meta={"instance": {}}, channel_names=channels, path="model.json")
    predictor = SimpleNamespace(members=[SimpleNamespace(info=info)])
    config = postprocess_settings(predictor, parse_thresholds("F=0.6,nms=0.2"))
    assert config.method == "polygons" and config.nms_threshold == 0.2 and config.thresholds == {"F": 0.6}
    with pytest.raises(ConfigError, match="nms_threshold must be a number in"):
        postprocess_settings(predictor, {"nms": "auto"})
