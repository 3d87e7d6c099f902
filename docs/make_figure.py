"""The README's picture: an input image beside the overlay ``inference.py`` drew for it.

    python docs/make_figure.py --image demo_output/new/images/cells_000.tif \
        --overlay demo_output/pred/overlays/cells_000.png --output docs/images/example.png

Both panels are shown at the overlay's size (the image is stretched for display the way every
picture of the toolkit is). Ends with one JSON line naming what it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.common import pictures  # noqa: E402
from lib.store import images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--overlay", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--gap", type=int, default=8)
    args = parser.parse_args()
    overlay = np.asarray(Image.open(args.overlay).convert("RGB"))
    image = pictures.display_image(images.read_image(args.image))
    # The overlay may carry a legend below the picture: scale the image to the overlay's width.
    width = overlay.shape[1]
    height = round(image.shape[0] * width / image.shape[1])
    picture = np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST))
    canvas = np.full((max(height, overlay.shape[0]), 2 * width + args.gap, 3), 255, np.uint8)
    canvas[:height, :width] = picture
    canvas[:overlay.shape[0], width + args.gap:] = overlay
    pictures.save_png(Path(args.output), canvas)
    print(json.dumps({"wrote": args.output, "size": [int(canvas.shape[1]), int(canvas.shape[0])]}))


if __name__ == "__main__":
    main()
