"""Volumes in the classifier's orientation: axis codes (``"RAS"``) checked, the flips and axis swaps
that take a volume's voxel axes to them (as MONAI's ``Orientation`` does: the same array and
affine), and back for its evidence; used by :mod:`monai_medcam.pipeline` and
:class:`~monai_medcam.transforms.ToClassifierSpace`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from monai_medcam.io import NOT_A_VOLUME

__all__ = ["check_orientation", "reorientation", "reorient", "oriented_shape", "source_slice"]


def check_orientation(axcodes: str | None, what: str = "orientation") -> str | None:
    """``axcodes`` (``"RAS"``, ``"las"``) as three upper-case codes, or ``None`` for ``None``, ``""`` or
    ``"none"``; anything else is a ``ValueError`` naming ``what``."""
    if axcodes is None:
        return None
    text = axcodes.strip().upper() if isinstance(axcodes, str) else ""
    if isinstance(axcodes, str) and text in ("", "NONE"):
        return None
    if len(text) != 3 or sorted("LRAPSI".find(c) // 2 for c in text) != [0, 1, 2]:  # 0: L/R, 1: A/P, 2: S/I; -1: other
        raise ValueError(f"{what} {axcodes!r}: give three axis codes, one of L/R, A/P and S/I each (e.g. RAS, LPS), or none.")
    return text


def ras_affine(image: MetaTensor) -> np.ndarray:
    """``image``'s affine in RAS world coordinates, as MONAI's ``Orientation`` reads it (an affine in
    LPS, ``meta["space"] == "LPS"``, e.g. from MONAI's readers with ``affine_lps_to_ras=False``, is
    converted)."""
    affine = np.asarray(image.affine, dtype=float)
    if str(image.meta.get("space", "RAS")).upper() == "LPS":
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return affine


def reorientation(image: torch.Tensor, axcodes: str | None) -> np.ndarray | None:
    """The nibabel orientation transform ``(3, 2)`` that takes the voxel axes of ``image`` ``(C, X, Y, Z)``
    to ``axcodes`` (read in RAS world coordinates from its affine, as MONAI's ``Orientation`` does), or
    ``None`` where there is nothing to do: no axis codes, a 2D image, a cine's frames (not a spatial
    axis), or a volume already so oriented."""
    if axcodes is None or not isinstance(image, MetaTensor) or image.ndim != 4 or image.meta.get(NOT_A_VOLUME):
        return None
    ornt = ornt_transform(io_orientation(ras_affine(image)), axcodes2ornt(axcodes))
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return None
    return ornt


def oriented_shape(shape: Sequence[int], ornt: np.ndarray | None) -> tuple[int, ...]:
    """The spatial ``shape`` of a volume after :func:`reorient` by ``ornt``."""
    return tuple(int(n) for n in shape) if ornt is None else tuple(int(shape[int(a)]) for a in np.argsort(ornt[:, 0]))


def reorient(data: torch.Tensor, ornt: np.ndarray | None, inverse: bool = False) -> torch.Tensor:
    """``data`` ``(C, X, Y, Z)`` with its spatial axes flipped and permuted by ``ornt`` (from
    :func:`reorientation`), or back with ``inverse``: exact, no resampling (``None``: unchanged)."""
    if ornt is None:
        return data
    if inverse:  # input axis i went to output axis ornt[i, 0], flipped where ornt[i, 1] < 0
        back = np.zeros_like(ornt)
        for i, (axis, flip) in enumerate(ornt):
            back[int(axis)] = (i, flip)
        ornt = back
    flips = [i + 1 for i, flip in enumerate(ornt[:, 1]) if flip < 0]
    data = data.flip(flips) if flips else data
    return data.permute(0, *(int(a) + 1 for a in np.argsort(ornt[:, 0])))


def source_slice(k: int, count: int, ornt: np.ndarray | None) -> int:
    """The source's index of slice ``k`` of ``count`` that a 2D classifier explains in a volume reoriented
    by ``ornt``: the same axis (:func:`~monai_medcam.pipeline.to_classifier_space` refuses another), reversed where
    it was flipped."""
    return count - 1 - k if ornt is not None and ornt[2, 1] < 0 else k
