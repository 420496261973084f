"""A MONAI bundle's own preprocessing: applied to each input as in the classifier's training, and
undone on its evidence with MONAI's ``Invertd``.

``medcam explain`` reads each file itself (DICOM series, multi-frame DICOM, NIfTI, PNG; ``io``),
so the bundle's loader and ``EnsureChannelFirst(d)`` are left out and the rest runs on the loaded
image ``(C, *S)``: spacing, orientation, intensity window, crop, resize, whatever the classifier
was trained with. The masks ``(1, *s)`` the classifier's input gets are inverted through the same
transforms onto the source's voxels ``(1, *S)``: binary masks with nearest neighbours (and evidence
thinner than a source voxel, which nearest sampling drops, kept), soft maps with the transforms' own
interpolation. Transforms that only change types (``ToTensord``, ``EnsureTyped``, ...) are left
out too: the explain job makes float tensors itself, and their inverses would hand the next
inverse a NumPy array.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Orientationd, Transform, allow_missing_keys_mode
from monai.transforms.utils import convert_applied_interp_mode

__all__ = ["BundlePreprocessing"]

_LOADERS = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd")  # medcam's own loader does these
_MEDCAM_OWN = ("LoadInput", "LoadInputd", "ToClassifierSpace", "ToClassifierSpaced")  # a bundle of medcam's own making
_TYPES_ONLY = ("ToTensor", "ToTensord", "EnsureType", "EnsureTyped", "ToNumpy", "ToNumpyd", "ToDevice", "ToDeviced", "CastToType",
               "CastToTyped", "ToCupy", "ToCupyd", "Identity", "Identityd")


class BundlePreprocessing:
    """The bundle's ``preprocessing`` without its loader, on one loaded image.

    Args:
        transform: the instantiated ``preprocessing`` (a ``Compose``, a list of transforms, or one).
        source: where it came from (``<bundle>/configs/inference.json``), for messages.

    Raises:
        ValueError: it cannot run here (no transforms left, a mix of dictionary and array
            transforms, dictionary transforms on several image keys, medcam's own transforms).
    """

    def __init__(self, transform: Callable, source: str) -> None:
        self.source = source
        if transform is None:
            raise ValueError(f"{source}: the preprocessing is disabled or empty.")
        steps = Compose(list(transform) if isinstance(transform, (list, tuple)) else [transform]).flatten().transforms
        names = [type(t).__name__ for t in steps]
        own = sorted(set(names) & set(_MEDCAM_OWN))
        if own:
            raise ValueError(f"{source}: the preprocessing is Med-CAM's own ({', '.join(own)}); use Med-CAM's own preparation (preprocessing medcam).")
        kept: list[Transform] = []
        key = _image_key(steps, source)
        for t, name in zip(steps, names):
            if name in _LOADERS:
                if _closest_canonical(t):
                    kept.append(Orientationd(key, axcodes="RAS") if key is not None else _array_orientation())
            elif name not in _TYPES_ONLY:
                if getattr(t, "lazy", False):  # run now: MONAI's inverse of a lazy transform would stay pending
                    t.lazy = False
                kept.append(t)
        if not kept:
            raise ValueError(f"{source}: the preprocessing has nothing but a loader and type conversions; use Med-CAM's own preparation (preprocessing medcam).")
        self.key = key  # None: array transforms
        self.transform = Compose(kept)
        self.names = [type(t).__name__ for t in kept]

    def __call__(self, image: MetaTensor) -> MetaTensor:
        """``(C, *S)`` as loaded -> the classifier's input ``(C', *s)``, its transforms recorded (``applied_operations``)."""
        if self.key is None:
            out = self.transform(image)
        else:
            with allow_missing_keys_mode(self.transform):  # transforms that also name "label" and the like
                out = self.transform({self.key: image})[self.key]
        if not isinstance(out, MetaTensor):
            raise ValueError(f"{self.source}: the preprocessing returned {type(out).__name__}, not a MetaTensor "
                             "(an EnsureTyped(track_meta=False) or ToNumpyd drops what the evidence is inverted with).")
        return out

    def invert(self, maps: torch.Tensor, prepared: MetaTensor, soft: bool) -> torch.Tensor:
        """``maps`` ``(1, *s)`` on ``prepared`` (what :meth:`__call__` gave) -> ``(1, *S)`` on the source's
        voxels. Soft maps: the transforms' own interpolation. Binary masks: nearest neighbours, and
        every source voxel that holds the centre of an evidence voxel: where the source is coarser
        than the classifier's input, nearest sampling alone drops evidence thinner than a source
        voxel (as ``back_to_source`` keeps it for Med-CAM's own resizing)."""
        if soft:
            return _values(self._inverse(maps, prepared, nearest=False))
        back = self._inverse(maps, prepared, nearest=True)
        mask = _values(back) > 0.5
        if isinstance(back, MetaTensor):
            index = _source_voxels(maps[0] > 0.5, prepared.affine, back.affine, mask.shape[1:])
            mask[(0, *index)] = True
        return mask.float()

    def _inverse(self, maps: torch.Tensor, prepared: MetaTensor, nearest: bool) -> MetaTensor | torch.Tensor:
        operations = deepcopy(prepared.applied_operations)
        if nearest:
            operations = convert_applied_interp_mode(operations, mode="nearest", align_corners=None)
        data = MetaTensor(maps.detach().float().cpu(), meta=deepcopy(prepared.meta), applied_operations=operations)
        if self.key is None:
            return self.transform.inverse(data)
        with allow_missing_keys_mode(self.transform):
            return self.transform.inverse({self.key: data})[self.key]

    def __repr__(self) -> str:
        return f"BundlePreprocessing({', '.join(self.names)}; from {self.source})"


def _closest_canonical(t: Transform) -> bool:
    """Whether a ``LoadImage(d)`` reorients to RAS (``as_closest_canonical``) through its reader's arguments."""
    loader = getattr(t, "_loader", t)
    return any(getattr(reader, "as_closest_canonical", False) for reader in getattr(loader, "readers", ()))


def _array_orientation() -> Transform:
    from monai.transforms import Orientation

    return Orientation(axcodes="RAS")


def _image_key(steps: list[Transform], source: str) -> str | None:
    """The key the dictionary transforms give the image: ``"image"`` where it is named, else the
    loader's first key, else the one key named; ``None`` for array transforms."""
    mapped = [t for t in steps if isinstance(t, MapTransform)]
    if not mapped:
        return None
    if len(mapped) != len(steps):
        plain = [type(t).__name__ for t in steps if not isinstance(t, MapTransform)]
        raise ValueError(f"{source}: the preprocessing mixes array transforms ({', '.join(plain)}) with dictionary ones; "
                         "medcam explain runs one kind.")
    keys = {k for t in mapped for k in t.keys}
    loaded = [t.keys[0] for t in mapped if type(t).__name__ == "LoadImaged"]
    if "image" in keys:
        return "image"
    if loaded or len(keys) == 1:
        return str(loaded[0] if loaded else next(iter(keys)))
    raise ValueError(f"{source}: the preprocessing works on keys {sorted(map(str, keys))}, none of them 'image' and no "
                     "loader to say which is the image; medcam explain gives it one image.")


def _values(data: MetaTensor | torch.Tensor) -> torch.Tensor:
    return (data.as_tensor() if isinstance(data, MetaTensor) else torch.as_tensor(data)).float()


def _source_voxels(evidence: torch.Tensor, affine: torch.Tensor, source_affine: torch.Tensor, shape: tuple) -> tuple:
    """Indices (one array per axis) of the source voxels that hold the centres of the ``evidence``
    voxels ``(*s)`` of the classifier's input, through both grids' affines (world coordinates)."""
    dims = evidence.ndim
    points = np.argwhere(evidence.cpu().numpy())
    a, b = np.asarray(affine, dtype=np.float64), np.asarray(source_affine, dtype=np.float64)
    world = points @ a[:-1, :dims].T + a[:-1, -1]
    index = np.rint((world - b[:-1, -1]) @ np.linalg.pinv(b[:-1, :dims]).T).astype(np.int64)
    inside = ((index >= 0) & (index < np.asarray(shape))).all(1)
    return tuple(index[inside].T)
