"""``MedCAMInferer``: Med-CAM wherever MONAI calls ``inferer(inputs, network)``.

MONAI's evaluators, bundles, MONAI Label and MONAI Deploy call inferers under ``torch.no_grad()``;
Med-CAM needs gradients for its mask networks, so the inferer re-enables them for its own
optimisation (the classifier stays frozen). Under ``torch.inference_mode()`` no gradient can be
made at all, and the inferer says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from monai_medcam.classifiers import LayerSpec, TargetLayer, index_tensor
from monai_medcam.engine import MedCAM, MedCAMResult, with_meta_of
from monai_medcam.settings import MedCAMSettings
from monai_medcam.transforms import DIAGNOSTICS_KEY, OUTPUTS, numbers_as_tensor

__all__ = ["MedCAMInferer"]


class MedCAMInferer(Inferer):
    """Explain a batch ``(B, C, *spatial)`` with ``network``: evidence masks ``(B, 1, *spatial)``.

    The returned MetaTensor carries the inputs' metadata and, under ``meta["medcam"]``, the
    diagnostics (label, probabilities, area, verified, steps) as one list per name, which MONAI's
    ``decollate_batch`` splits so that each image gets its own values. The full
    :class:`~monai_medcam.MedCAMResult` of the last call is kept as ``last_result``.

    A 2D classifier explains volumes ``(B, C, H, W, D)`` slice by slice along the last axis when
    ``spatial_dims=2``: the masks are ``(B, 1, H, W, D)`` and each diagnostic is a ``(B, D)`` tensor,
    one value per slice.

    Args:
        target_layers: as for :class:`~monai_medcam.MedCAM`.
        class_idx: class to explain: one for all images, or one per image (slice by slice: one per
            volume, or one per slice in (B, D) order); the prediction when ``None``.
        output: ``"mask"`` or ``"soft_mask"``.
        spatial_dims: the classifier's spatial dimensions; ``None`` takes the input's.
        batch_size: the most images (or slices) optimised together; ``None`` for all at once.
        settings: any :class:`~monai_medcam.MedCAMSettings` field.

    Example::

        evaluator = SupervisedEvaluator(device, loader, network=classifier, inferer=MedCAMInferer(steps=200))
    """

    def __init__(
        self,
        target_layers: str | Sequence[LayerSpec | TargetLayer] = "auto",
        class_idx: int | Sequence[int] | torch.Tensor | None = None,
        output: str = "mask",
        spatial_dims: int | None = None,
        batch_size: int | None = None,
        **settings: object,
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
        if spatial_dims not in (None, 2, 3):
            raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims!r}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        MedCAMSettings.from_kwargs(**settings)  # unknown names fail now, not at the first batch
        self.target_layers = target_layers
        self.class_idx = class_idx
        self.output = output
        self.spatial_dims = spatial_dims
        self.batch_size = batch_size
        self.settings = settings
        self.last_result: MedCAMResult | None = None
        self._explainer: tuple[tuple, MedCAM] | None = None  # for the last network and settings

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> MetaTensor:
        if args or kwargs:
            raise ValueError("MedCAMInferer calls the network with the image alone; it cannot pass extra arguments.")
        if torch.is_inference_mode_enabled():
            raise ValueError(
                "MedCAMInferer optimises mask networks and needs gradients, which torch.inference_mode() forbids; "
                "run it under torch.no_grad() (as MONAI's evaluators do) or with no context."
            )
        inputs = numbers_as_tensor(inputs)
        if not isinstance(inputs, torch.Tensor):
            raise ValueError(f"MedCAMInferer takes a batch tensor (B, C, *spatial), got {type(inputs).__name__}.")
        data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        dims = data.ndim - 2
        sliced = self.spatial_dims == 2 and dims == 3
        if self.spatial_dims is not None and not sliced and dims != self.spatial_dims:
            expected = "(B, C, H, W) or, slice by slice, (B, C, H, W, D)" if self.spatial_dims == 2 else "(B, C, H, W, D)"
            raise ValueError(f"a {self.spatial_dims}D classifier cannot explain inputs of shape {tuple(data.shape)} (expected {expected}).")
        count, depth = data.shape[0], data.shape[-1] if sliced else 1
        images = data.movedim(-1, 1).flatten(0, 1) if sliced else data  # (B * D, C, H, W) slices
        class_idx = self.class_idx
        if sliced and class_idx is not None:  # one per volume: each of its slices explains that class
            given = index_tensor(class_idx)
            if given.numel() == count:
                class_idx = given.repeat_interleave(depth)
            elif given.numel() not in (1, count * depth):
                raise ValueError(f"class_idx gives {given.numel()} labels for {count} volume(s) of {depth} slices: "
                                 f"give one, one per volume ({count}) or one per slice ({count * depth}).")
        key = (network, repr(self.target_layers), repr(sorted(self.settings.items())))
        if self._explainer is None or self._explainer[0] != key:  # kept while they stay: it learns the batch size that fits
            self._explainer = (key, MedCAM(network, self.target_layers, **self.settings))
        explainer = self._explainer[1]
        with torch.enable_grad():
            names = [f"{b}/slice {d}" for b in range(count) for d in range(depth)] if sliced else None  # for the log
            result = explainer.explain(images, class_idx, batch_size=self.batch_size, names=names)
        self.last_result = result
        values = getattr(result, self.output)
        values = values.as_tensor() if isinstance(values, MetaTensor) else values
        rows = result.summary()
        diagnostics = {name: [row[name] for row in rows] for name in rows[0]}
        if sliced:
            values = values.reshape(count, depth, *values.shape[1:]).movedim(1, -1)  # (B, 1, H, W, D)
            # (B, D) tensors: decollate_batch gives each volume its (D,) row; nested lists it would transpose
            diagnostics = {name: torch.tensor(column).reshape(count, depth) for name, column in diagnostics.items()}
        out = MetaTensor(values)
        if isinstance(inputs, MetaTensor):
            with_meta_of(out, inputs)  # a copy: the inputs' metadata stays as it is
        if out.affine.ndim == 2:  # a plain tensor's default affine, or an unbatched MetaTensor's: one per image
            out.affine = out.affine.expand(count, *out.affine.shape).clone()
        out.meta[DIAGNOSTICS_KEY] = diagnostics  # columns decollate per image (per volume: one list per name)
        out.is_batch = True  # decollate_batch then gives each image its own meta, diagnostics included
        return out
