"""charts.png of a training run: every evaluation a visible point, the best step marked (lib/training/outputs.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lib.training.outputs import best_row, draw_charts

BLUE = np.array([31, 119, 180])  # matplotlib's first series colour (train loss, mean IoU)
GREY = np.array([102, 102, 102])  # the dashed line of the best step ("0.4")


def _rows(ious, losses):
    return [{"step": 100.0 * (k + 1), "train_loss": loss * 1.2, "test_loss": loss, "mean_iou": iou,
             "pixel_accuracy": 0.9} for k, (iou, loss) in enumerate(zip(ious, losses))]


def _pixels(path, colour, tolerance=12):
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    close = (np.abs(rgb - colour) <= tolerance).all(axis=2)
    half = rgb.shape[1] // 2
    return int(close[:, :half].sum()), int(close[:, half:].sum())


@pytest.mark.parametrize("evaluations", [1, 2])
def test_one_or_two_evaluations_show_as_points(tmp_path, evaluations):
    ious, losses = [0.5, 0.6][:evaluations], [0.4, 0.3][:evaluations]
    shown = draw_charts(_rows(ious, losses), tmp_path / "shown")
    # The same chart with the IoU outside the panel's 0..1: the legend is the same, the points are not drawn.
    hidden = draw_charts(_rows([5.0] * evaluations, losses), tmp_path / "hidden")
    blue_shown, blue_hidden = _pixels(shown, BLUE)[1], _pixels(hidden, BLUE)[1]
    assert blue_shown - blue_hidden >= 20 * evaluations, (blue_shown, blue_hidden)  # a marker is ~25 px
    # the best step (lowest test loss) is a dashed line across each panel
    grey_loss, grey_quality = _pixels(shown, GREY, tolerance=4)
    assert grey_loss >= 60 and grey_quality >= 60, (grey_loss, grey_quality)


def test_no_evaluation_is_an_empty_chart_and_best_is_the_first_lowest_test_loss(tmp_path):
    assert draw_charts([], tmp_path).name == "charts.png"
    assert best_row([]) is None
    rows = _rows([0.1, 0.2, 0.3], [0.5, 0.2, 0.2])
    assert best_row(rows)["step"] == 200.0
    assert best_row(_rows([0.1], [float("nan")])) is None
