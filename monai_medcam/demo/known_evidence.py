"""Images whose evidence is known: real medical backgrounds with synthetic, class-specific lesions.

Class 1 images carry a lesion (its exact mask is the ground truth); class 0 images carry none.
Both classes carry class-independent distractors (bright rings) that a good explanation leaves
out. Backgrounds are real images shipped by installed packages (scikit-image's fundus photo and
IHC histology; for ``"radiology"`` the MR, CT, CR and ultrasound images of pydicom-data and
nibabel's MRI volume), cut into random crops, so nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "KnownEvidence",
    "background_image",
    "radiology_images",
    "make_known_evidence",
    "make_known_evidence_3d",
    "LESION_KINDS",
    "LESION_COLOUR",
    "paint_lesion",
    "BACKGROUNDS",
    "DATA_STORE_FILES",
]

BACKGROUNDS = ("retina", "ihc", "radiology")
LESION_KINDS = ("disc", "spots")
LESION_COLOUR = (1.0, 0.95, 0.55)  # RGB in [0, 1]; grayscale images take its mean


def paint_lesion(pixels: np.ndarray, colour: np.ndarray | float) -> np.ndarray:
    """Lesion pixels as every known-evidence image paints them: ``0.25 * pixels + 0.75 * colour``."""
    return 0.25 * pixels + 0.75 * colour


@dataclass
class KnownEvidence:
    """A known-evidence set.

    Attributes:
        images: ``(N, C, S, S)`` float32 in [0, 1].
        labels: ``(N,)`` int64, 1 where a lesion is present.
        lesion_masks: ``(N, 1, S, S)`` float32, the lesion's exact pixels (empty for class 0).
        distractor_masks: ``(N, 1, S, S)`` float32, the distractors' pixels.
    """

    images: np.ndarray
    labels: np.ndarray
    lesion_masks: np.ndarray
    distractor_masks: np.ndarray


def background_image(name: str) -> np.ndarray:
    """A real image ``(H, W, 3)`` float32 in [0, 1] shipped by scikit-image (no download)."""
    from skimage import data

    if name == "retina":
        image = data.retina()
    elif name == "ihc":
        image = data.immunohistochemistry()
    else:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {name!r}.")
    return image.astype(np.float32) / 255.0


def _stretch(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, 0.5), np.percentile(image, 99.5)
    return np.clip((image.astype(np.float32) - low) / max(high - low, 1e-6), 0, 1)


# the radiology backgrounds from pydicom-data (MR_small and CT_small come with pydicom itself)
DATA_STORE_FILES = ("MR2_UNCR.dcm", "RG1_UNCR.dcm", "RG3_UNCR.dcm", "US1_UNCR.dcm")


def radiology_images() -> list[np.ndarray]:
    """Real grayscale radiology images ``(H, W, 3)`` in [0, 1] (gray repeated): pydicom-data's MR, CT,
    CR (MONOCHROME1 inverted) and ultrasound, axial slices of nibabel's example MRI volume, and
    scikit-image's fundus photo in gray."""
    import nibabel
    import pydicom
    from pydicom.data import get_testdata_file

    images = []
    for name in ("MR_small.dcm", "CT_small.dcm", *DATA_STORE_FILES):
        ds = pydicom.dcmread(get_testdata_file(name, download=False) or _data_store(name))
        pixels = ds.pixel_array.astype(np.float32)
        if pixels.ndim == 3:
            pixels = pixels.mean(-1)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            pixels = pixels.max() - pixels
        images.append(_stretch(pixels))
    volume = nibabel.load(Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz").get_fdata()[..., 0]
    images += [_stretch(volume[:, :, z].T) for z in range(6, 18, 3)]
    images.append(background_image("retina").mean(-1))  # fundus photos are often read in gray too
    return [np.repeat(image[..., None], 3, axis=-1) for image in images]


def _data_store(name: str) -> str:
    """The path of a pydicom-data file, found without pydicom's network lookup."""
    import data_store  # installed by pydicom-data

    path = Path(data_store.__file__).parent / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not in pydicom-data ({path}); pip install pydicom-data.")
    return str(path)


def disc(shape: tuple[int, int], centre, radius: float) -> np.ndarray:
    """Boolean ``shape`` array, True within ``radius`` of ``centre`` (row, column)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius**2


def _crop(background: np.ndarray, size: int, rng: np.random.Generator, min_mean: float) -> np.ndarray:
    """A random square crop rescaled to ``size``, retried until it is not mostly black."""
    from skimage.transform import resize

    h, w = background.shape[:2]
    for _ in range(50):
        side = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        crop = background[y : y + side, x : x + side]
        if crop.mean() >= min_mean:
            break
    return resize(crop, (size, size), anti_aliasing=True, preserve_range=True).astype(np.float32)


def make_known_evidence(
    count: int,
    size: int = 96,
    background: str = "retina",
    lesion: str = "disc",
    channels: int = 3,
    seed: int = 0,
    whole_share: float = 0.0,
) -> KnownEvidence:
    """Make ``count`` images, half with a lesion (class 1), all with random distractors.

    Args:
        count: number of images.
        size: side in pixels.
        background: ``"retina"`` (fundus photo), ``"ihc"`` (histology) or ``"radiology"`` (a
            random one of :func:`radiology_images` per image).
        lesion: ``"disc"`` (one yellow-white blob, like an exudate) or ``"spots"`` (a cluster of small dots).
        channels: 3 (RGB) or 1 (grayscale, the mean of RGB).
        seed: the random seed; the same seed gives the same images.
        whole_share: share of the images made from a whole background image squeezed to
            ``size`` x ``size`` (as a pipeline resizes a whole study for its classifier) instead of
            a random crop of a quarter to half its side.
    """
    if lesion not in LESION_KINDS:
        raise ValueError(f"lesion must be one of {LESION_KINDS}, got {lesion!r}.")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    sources = radiology_images() if background == "radiology" else [background_image(background)]
    images = np.zeros((count, 3, size, size), np.float32)
    lesions = np.zeros((count, 1, size, size), np.float32)
    distractors = np.zeros((count, 1, size, size), np.float32)
    labels = (np.arange(count) % 2).astype(np.int64)
    rng.shuffle(labels)
    lesion_colour = np.array(LESION_COLOUR, np.float32)[:, None]
    wholes: dict[int, np.ndarray] = {}  # each source squeezed to size x size, once
    for i in range(count):
        k = int(rng.integers(len(sources)))
        if whole_share and rng.random() < whole_share:  # no draw at 0: the crops of a seed stay those they were
            if k not in wholes:
                wholes[k] = resize(sources[k], (size, size), anti_aliasing=True, preserve_range=True).astype(np.float32)
            image = wholes[k].transpose(2, 0, 1).copy()
        else:
            image = _crop(sources[k], size, rng, min_mean=0.15).transpose(2, 0, 1).copy()
        for _ in range(int(rng.integers(1, 3))):  # distractors: thin bright rings, in both classes
            centre = rng.uniform(0.1 * size, 0.9 * size, 2)
            radius = rng.uniform(0.06, 0.1) * size
            ring = disc((size, size), centre, radius) & ~disc((size, size), centre, radius - 1.5)
            image[:, ring] = 0.95
            distractors[i, 0, ring] = 1
        if labels[i] == 1:
            centre = rng.uniform(0.25 * size, 0.75 * size, 2)
            if lesion == "disc":
                shape = disc((size, size), centre, rng.uniform(0.06, 0.1) * size)
            else:
                shape = np.zeros((size, size), bool)
                for _ in range(int(rng.integers(4, 7))):
                    offset = rng.normal(0, 0.06 * size, 2)
                    shape |= disc((size, size), centre + offset, rng.uniform(0.015, 0.03) * size + 0.8)
            image[:, shape] = paint_lesion(image[:, shape], lesion_colour)
            lesions[i, 0, shape] = 1
            distractors[i, 0, shape] = 0
        images[i] = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    if channels == 1:
        images = images.mean(1, keepdims=True)
    return KnownEvidence(images.astype(np.float32), labels, lesions, distractors)


def mri_volume() -> np.ndarray:
    """nibabel's example MRI volume ``(128, 96, 24)`` (first time point), stretched to [0, 1]."""
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    return _stretch(np.asarray(nibabel.load(path).dataobj[..., 0], dtype=np.float32))


def _ball(shape: tuple[int, ...], centre, radius: float) -> np.ndarray:
    """Boolean ``shape`` array, True within ``radius`` of ``centre`` (squared distances broadcast per axis)."""
    axes = [np.arange(n, dtype=float).reshape([-1 if k == a else 1 for k in range(len(shape))]) for a, n in enumerate(shape)]
    return sum((axis - c) ** 2 for axis, c in zip(axes, np.asarray(centre, float))) <= radius**2


def make_known_evidence_3d(count: int, size: int = 32, seed: int = 0) -> KnownEvidence:
    """Volumes ``(count, 1, S, S, S)`` cut from nibabel's example MRI, half with a bright ball lesion.

    Random sub-volumes (resampled to ``size`` per side) of the real brain MRI; class 1 volumes carry
    a bright ball (radius 10-15% of the side; its exact voxels are the ground truth), both classes 1-2
    bright spherical shells as distractors. Fields as :class:`KnownEvidence`, with 3D spatial shape.
    """
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    source = mri_volume()
    shape = (size,) * 3
    images = np.zeros((count, 1, *shape), np.float32)
    lesions = np.zeros_like(images)
    distractors = np.zeros_like(images)
    labels = (np.arange(count) % 2).astype(np.int64)
    rng.shuffle(labels)
    for i in range(count):
        side = [int(rng.integers(n // 2, n + 1)) for n in source.shape]
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(source.shape, side)]
        crop = source[tuple(slice(a, a + s) for a, s in zip(start, side))]
        volume = resize(crop, shape, anti_aliasing=True, preserve_range=True).astype(np.float32)
        for _ in range(int(rng.integers(1, 3))):
            centre, radius = rng.uniform(0.15 * size, 0.85 * size, 3), rng.uniform(0.08, 0.12) * size
            shell = _ball(shape, centre, radius) & ~_ball(shape, centre, radius - 1.2)
            volume[shell] = 0.95
            distractors[i, 0, shell] = 1
        if labels[i] == 1:
            ball = _ball(shape, rng.uniform(0.3 * size, 0.7 * size, 3), rng.uniform(0.1, 0.15) * size)
            volume[ball] = 0.2 * volume[ball] + 0.8
            lesions[i, 0, ball] = 1
            distractors[i, 0, ball] = 0
        images[i, 0] = np.clip(volume + rng.normal(0, 0.02, shape), 0, 1)
    return KnownEvidence(images, labels, lesions, distractors)
