"""MONAI transforms: ``MedCAMExplain`` (arrays) and ``MedCAMExplaind`` (dictionaries).

Both take a channel-first image ``(C, *spatial)`` as MONAI pipelines carry it and give the
binary evidence mask ``(1, *spatial)`` as a MetaTensor with the image's metadata (affine, source
files) plus Med-CAM's diagnostics under ``meta["medcam"]`` (label, probabilities, area, verified,
steps). Use them in a ``Compose`` after loading, or as post-transforms.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from monai_medcam.classifiers import LayerSpec, TargetLayer
from monai_medcam.engine import MedCAM, MedCAMResult

__all__ = ["MedCAMExplain", "MedCAMExplaind", "DIAGNOSTICS_KEY", "evidence_from_result"]

DIAGNOSTICS_KEY = "medcam"
OUTPUTS = ("mask", "soft_mask")


def evidence_from_result(result: MedCAMResult, index: int, like: torch.Tensor, output: str = "mask") -> MetaTensor:
    """Image ``index`` of ``result`` as ``(1, *spatial)`` on ``like``'s device, with ``like``'s metadata and the diagnostics."""
    values = getattr(result, output)[index]
    values = values.as_tensor() if isinstance(values, MetaTensor) else values
    meta = dict(like.meta) if isinstance(like, MetaTensor) else {}
    meta[DIAGNOSTICS_KEY] = result.summary()[index]
    return MetaTensor(values.to(like.device), meta=meta)


def _check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
    return output


class MedCAMExplain(Transform):
    """Med-CAM evidence for one channel-first image.

    Args:
        nn_module: the frozen classifier ``(B, C, *spatial) -> (B, K)``; the image is moved to its device.
        target_layers: as for :class:`~monai_medcam.MedCAM`.
        class_idx: class to explain; the prediction when ``None``.
        output: ``"mask"`` (binary evidence) or ``"soft_mask"`` (the mask network's sigmoid).
        settings: any :class:`~monai_medcam.MedCAMSettings` field (``steps``, ``seed``, ...).

    Example::

        explain = MedCAMExplain(classifier, steps=200)
        evidence = explain(image)          # (1, H, W) MetaTensor; evidence.meta["medcam"]["verified"]
    """

    def __init__(
        self,
        nn_module: torch.nn.Module,
        target_layers: str | Sequence[LayerSpec | TargetLayer] = "auto",
        class_idx: int | None = None,
        output: str = "mask",
        **settings: object,
    ) -> None:
        self.explainer = MedCAM(nn_module, target_layers, **settings)
        self.class_idx = class_idx
        self.output = _check_output(output)

    def _device(self, img: torch.Tensor) -> torch.device:
        params = list(self.explainer.nn_module.parameters())
        return params[0].device if params else img.device

    def __call__(self, img: torch.Tensor, class_idx: int | None = None) -> MetaTensor:
        """``img`` ``(C, *spatial)`` -> evidence ``(1, *spatial)``."""
        if not isinstance(img, torch.Tensor) or img.ndim not in (3, 4):
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"MedCAMExplain takes a channel-first image (C, H, W[, D]); got {shape}.")
        x = img.as_tensor() if isinstance(img, MetaTensor) else img
        result = self.explainer.explain(x[None].to(self._device(img)), self.class_idx if class_idx is None else class_idx)
        return evidence_from_result(result, 0, img, self.output)


class MedCAMExplaind(MapTransform):
    """Dictionary twin of :class:`MedCAMExplain`: adds ``data[output_key]`` for each of ``keys``.

    Args:
        keys: the image keys to explain.
        nn_module, target_layers, class_idx, output, settings: as for :class:`MedCAMExplain`.
        output_keys: where to put each evidence mask; ``"{key}_evidence"`` by default.
        class_idx_key: take the class to explain from ``data[class_idx_key]`` (e.g. the ground-truth label).
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        nn_module: torch.nn.Module,
        target_layers: str | Sequence[LayerSpec | TargetLayer] = "auto",
        class_idx: int | None = None,
        output: str = "mask",
        output_keys: KeysCollection | None = None,
        class_idx_key: Hashable | None = None,
        allow_missing_keys: bool = False,
        **settings: object,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.explain = MedCAMExplain(nn_module, target_layers, class_idx, output, **settings)
        names = [f"{key}_evidence" for key in self.keys] if output_keys is None else list(output_keys)
        if isinstance(output_keys, str):
            names = [output_keys]
        if len(names) != len(self.keys):
            raise ValueError(f"output_keys has {len(names)} names for {len(self.keys)} keys.")
        self.output_keys = names
        self.class_idx_key = class_idx_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        class_idx = None
        if self.class_idx_key is not None:
            if self.class_idx_key not in d:
                raise KeyError(f"class_idx_key {self.class_idx_key!r} is not in the data (keys: {list(d)}).")
            class_idx = int(torch.as_tensor(d[self.class_idx_key]).flatten()[0])
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.explain(d[key], class_idx)
        return d
