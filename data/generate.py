#!/usr/bin/env python3
"""Generate the synthetic example dataset used by the demo and the tests.

Fluorescence-like uint16 images of cells: objects of varied size, shape, orientation and
brightness, some touching and some overlapping (the later one occludes), uneven
illumination, optical blur, shot and read noise. For each image it writes

    images/NAME.tif              (H, W) uint16
    masks/NAME.png               semantic mask: 0 background, 1 cell, 2 cell boundary
    instances/NAME.tif           instance labels 1..I (uint16)
    experts/expertK/NAME.png     perturbed binary masks of several simulated annotators

    python data/generate.py --output_folder demo_output/data --n_images 16 --seed 0

Every file is written through :func:`lib.store.images.write_image` (atomic, modes from the umask).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.cli import make_parser, run_main  # noqa: E402  (after the path set-up above)
from lib.common.settings import ConfigError  # noqa: E402
from lib.store.images import write_image  # noqa: E402


def _blob_mask(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float,
               wobble: np.ndarray) -> tuple[slice, slice, np.ndarray]:
    """Boolean mask of one irregular ellipse within its bounding box.

    ``wobble``: Fourier coefficients that perturb the radius with the polar angle, so
    objects are not perfect ellipses.
    """
    r = max(ry, rx) * 1.35 + 2
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, shape[0])
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, shape[1])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    theta = np.arctan2(v, u)
    radius = 1.0 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(wobble))
    inside = (u / rx) ** 2 + (v / ry) ** 2 <= radius ** 2
    return slice(y0, y1), slice(x0, x1), inside


def synthesize(rng: np.random.Generator, height: int = 384, width: int = 384,
               n_objects: tuple[int, int] = (20, 45)) -> tuple[np.ndarray, np.ndarray]:
    """One image and its instance labels.

    Returns ``image`` (H, W) uint16 and ``instances`` (H, W) uint16 with 0 = background.
    """
    import cv2

    instances = np.zeros((height, width), np.uint16)
    signal = np.zeros((height, width), np.float32)
    count = int(rng.integers(*n_objects))
    label = 0
    for _ in range(count):
        ry = float(rng.uniform(6, 22))
        rx = ry * float(rng.uniform(0.5, 1.0))
        # Half of the objects are placed next to an existing one: touching and overlapping cells.
        if label and rng.random() < 0.35:
            ys, xs = np.nonzero(instances)
            j = int(rng.integers(len(ys)))
            cy = float(np.clip(ys[j] + rng.normal(0, ry), 0, height - 1))
            cx = float(np.clip(xs[j] + rng.normal(0, ry), 0, width - 1))
        else:
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        wobble = [(float(rng.uniform(0, 0.12)), float(rng.uniform(0, 2 * np.pi))) for _ in range(3)]
        sy, sx, inside = _blob_mask((height, width), cy, cx, ry, rx, float(rng.uniform(0, np.pi)), wobble)
        if inside.sum() < 20:
            continue
        label += 1
        instances[sy, sx][inside] = label
        brightness = float(rng.uniform(0.35, 1.0))
        # Brighter nucleus-like core and a little texture inside each object.
        yy, xx = np.nonzero(inside)
        core = np.exp(-(((yy - yy.mean()) / (ry * 0.8)) ** 2 + ((xx - xx.mean()) / (rx * 0.8)) ** 2))
        texture = 1 + 0.15 * rng.standard_normal(len(yy))
        block = signal[sy, sx]
        block[inside] = brightness * (0.6 + 0.4 * core) * texture
        signal[sy, sx] = block
    # Uneven illumination: a tilted plane times a broad Gaussian spot.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gy, gx = rng.uniform(-0.3, 0.3, size=2)
    illumination = 1 + gy * (yy / height - 0.5) + gx * (xx / width - 0.5)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    illumination *= 0.8 + 0.4 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.6 * max(height, width)) ** 2))
    background = 0.08 + 0.03 * cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 12)
    optical = cv2.GaussianBlur(signal, (0, 0), float(rng.uniform(0.8, 1.8)))
    expected = (background + optical) * illumination * 20000.0
    photons = rng.poisson(np.clip(expected, 0, None) / 4.0) * 4.0  # shot noise at gain 4
    image = photons + rng.normal(300.0, 60.0, size=expected.shape)  # offset + read noise
    return np.clip(image, 0, 65535).astype(np.uint16), instances


def semantic_from_instances(instances: np.ndarray) -> np.ndarray:
    """Semantic mask (H, W) uint8: 0 background, 1 cell, 2 boundary (inner boundary of each instance)."""
    from skimage.segmentation import find_boundaries

    semantic = (instances > 0).astype(np.uint8)
    semantic[find_boundaries(instances, mode="inner") & (instances > 0)] = 2
    return semantic


def expert_mask(instances: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A simulated annotator's binary mask: objects grown or shrunk by a pixel or two, a few missed."""
    import cv2

    foreground = np.zeros(instances.shape, np.uint8)
    labels = np.unique(instances)
    labels = labels[labels > 0]
    keep = labels[rng.random(len(labels)) > 0.06]  # each annotator misses a few cells
    foreground[np.isin(instances, keep)] = 1
    bias = int(rng.integers(-1, 3))  # annotators tend to draw slightly outside the edge
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(bias) + 1, 2 * abs(bias) + 1))
    if bias > 0:
        foreground = cv2.dilate(foreground, kernel)
    elif bias < 0:
        foreground = cv2.erode(foreground, kernel)
    # Boundary jitter: flip a sparse set of pixels on the object edges.
    edge = cv2.morphologyEx(foreground, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    flip = edge & (rng.random(instances.shape) < 0.25)
    foreground[flip] = 1 - foreground[flip]
    return foreground


def generate_dataset(output_folder: str | Path, n_images: int = 16, height: int = 384, width: int = 384,
                     n_experts: int = 3, seed: int = 0) -> Path:
    """Write the dataset described in the module docstring into ``output_folder``.

    Raises ``ConfigError`` (a ``ValueError``) listing every invalid argument; nothing is written then.
    """
    violations = [f"{name} must be >= {low}; got {value}" for name, value, low in
                  (("n_images", n_images, 1), ("n_experts", n_experts, 0), ("height", height, 32),
                   ("width", width, 32)) if value < low]
    if violations:
        raise ConfigError(violations)
    out = Path(output_folder)
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        image, instances = synthesize(rng, height, width)
        name = f"cells_{i:03d}"
        write_image(out / "images" / f"{name}.tif", image)
        write_image(out / "masks" / f"{name}.png", semantic_from_instances(instances))
        write_image(out / "instances" / f"{name}.tif", instances)
        for k in range(n_experts):
            expert_rng = np.random.default_rng([seed, i, 1000 + k])
            write_image(out / "experts" / f"expert{k + 1}" / f"{name}.png", expert_mask(instances, expert_rng))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("Generate the synthetic example microscopy dataset.")
    parser.add_argument("--output_folder", required=True)
    parser.add_argument("--n_images", type=int, default=16)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--n_experts", type=int, default=3, help="perturbed expert masks per image (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def body() -> int:
        out = generate_dataset(args.output_folder, args.n_images, args.height, args.width, args.n_experts, args.seed)
        print(f"wrote {args.n_images} images of {args.height}x{args.width} with masks, instances and "
              f"{args.n_experts} expert masks each to {out}")
        return 0

    return run_main(body, prog="generate.py")


if __name__ == "__main__":
    sys.exit(main())
