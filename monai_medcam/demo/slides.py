"""A demo whole-slide image from real histology: scikit-image's IHC section, mosaicked and pyramidal.

``write_demo_slide`` writes a tiled pyramidal TIFF (levels as consecutive pages, each half the
previous, with resolution tags) that openslide and tifffile both read: tissue on the left, glass
on the right, and synthetic lesions (the histology demo classifier's class 1) at known places.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_medcam.demo.known_evidence import disc, paint_lesion
from monai_medcam.writers import atomic_path

__all__ = ["write_demo_slide", "write_pyramidal_tiff", "LESION_CENTRES"]

LESION_CENTRES = ((384, 1408), (1664, 384), (1408, 1408))  # (y, x) at level 0: inside the tissue, mid-tile at level 2, tile 64
LESION_COLOUR = np.array([255, 242, 140], np.float32)  # the known-evidence lesion colour, as uint8


def write_pyramidal_tiff(image: np.ndarray, path: str | Path, levels: int, mpp: float = 0.5, tile: int = 256) -> Path:
    """Write ``image`` ``(H, W, 3)`` uint8 as ``levels`` tiled pages, each half the previous."""
    import tifffile
    from skimage.transform import downscale_local_mean

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        current = image
        for k in range(levels):
            tif.write(
                current, tile=(tile, tile), photometric="rgb", compression="zlib", subfiletype=1 if k else 0,
                resolution=(1e4 / (mpp * 2**k), 1e4 / (mpp * 2**k)), resolutionunit="CENTIMETER", metadata=None,
            )
            current = downscale_local_mean(current, (2, 2, 1)).round().astype(np.uint8)
    return Path(path)


def write_demo_slide(
    path: str | Path, height: int = 2048, width: int = 2560, levels: int = 4,
    lesions: Sequence[tuple[int, int]] = LESION_CENTRES, radius: int = 22, tissue_width: int | None = None,
) -> np.ndarray:
    """Write the demo slide to ``path``; return the lesion mask ``(height, width)`` at level 0.

    Args:
        path: the ``.tif`` to write.
        height, width: level-0 size; the IHC section (upsampled 2x) is mirrored to fill it.
        levels: pyramid levels.
        lesions: lesion centres ``(y, x)`` at level 0.
        radius: lesion radius at level 0.
        tissue_width: columns of tissue; the rest is glass (default: all but the right fifth).
    """
    from skimage import data

    section = np.repeat(np.repeat(data.immunohistochemistry(), 2, axis=0), 2, axis=1)  # (1024, 1024, 3)
    tiled = np.concatenate([section, section[::-1]], axis=0)
    tiled = np.concatenate([tiled, tiled[:, ::-1]], axis=1)
    reps = (-(-height // tiled.shape[0]), -(-width // tiled.shape[1]), 1)
    image = np.tile(tiled, reps)[:height, :width].copy()
    glass = int(0.8 * width) if tissue_width is None else tissue_width
    rng = np.random.default_rng(0)
    image[:, glass:] = (242 + rng.integers(-4, 5, (height, width - glass, 1))).clip(0, 255).astype(np.uint8)
    truth = np.zeros((height, width), bool)
    for centre in lesions:
        shape = disc((height, width), centre, radius)
        image[shape] = paint_lesion(image[shape], LESION_COLOUR).astype(np.uint8)
        truth |= shape
    write_pyramidal_tiff(image, path, levels)
    return truth


def main() -> None:
    """``python -m monai_medcam.demo.slides OUTPUT.tif``: write the demo slide."""
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m monai_medcam.demo.slides OUTPUT.tif")
    truth = write_demo_slide(sys.argv[1])
    print(f"wrote {sys.argv[1]}: 2560 x 2048 pixels, 4 levels, {len(LESION_CENTRES)} lesions ({int(truth.sum())} pixels at level 0)")


if __name__ == "__main__":
    main()
