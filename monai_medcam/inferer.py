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

from monai_medcam.classifiers import LayerSpec, TargetLayer
from monai_medcam.engine import MedCAM, MedCAMResult
from monai_medcam.settings import MedCAMSettings
from monai_medcam.transforms import DIAGNOSTICS_KEY, OUTPUTS

__all__ = ["MedCAMInferer"]


class MedCAMInferer(Inferer):
    """Explain a batch ``(B, C, *spatial)`` with ``network``: evidence masks ``(B, 1, *spatial)``.

    The returned MetaTensor carries the inputs' metadata and, under ``meta["medcam"]``, the
    diagnostics (label, probabilities, area, verified, steps) as one list per name, which MONAI's
    ``decollate_batch`` splits so that each image gets its own values. The full :class:`~monai_medcam.MedCAMResult` of the
    last call is kept as ``last_result``.

    Args:
        target_layers: as for :class:`~monai_medcam.MedCAM`.
        class_idx: class to explain (one for all images); the prediction when ``None``.
        output: ``"mask"`` or ``"soft_mask"``.
        settings: any :class:`~monai_medcam.MedCAMSettings` field.

    Example::

        evaluator = SupervisedEvaluator(device, loader, network=classifier, inferer=MedCAMInferer(steps=200))
    """

    def __init__(
        self,
        target_layers: str | Sequence[LayerSpec | TargetLayer] = "auto",
        class_idx: int | None = None,
        output: str = "mask",
        **settings: object,
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
        MedCAMSettings.from_kwargs(**settings)  # unknown names fail now, not at the first batch
        self.target_layers = target_layers
        self.class_idx = class_idx
        self.output = output
        self.settings = settings
        self.last_result: MedCAMResult | None = None

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> MetaTensor:
        if args or kwargs:
            raise ValueError("MedCAMInferer calls the network with the image alone; it cannot pass extra arguments.")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "MedCAMInferer optimises mask networks and needs gradients, which torch.inference_mode() forbids; "
                "run it under torch.no_grad() (as MONAI's evaluators do) or with no context."
            )
        with torch.enable_grad():
            result = MedCAM(network, self.target_layers, **self.settings).explain(inputs, self.class_idx)
        self.last_result = result
        values = getattr(result, self.output)
        out = MetaTensor(values.as_tensor() if isinstance(values, MetaTensor) else values)
        if isinstance(inputs, MetaTensor):
            out.copy_meta_from(inputs, copy_attr=False)
        rows = result.summary()
        out.meta[DIAGNOSTICS_KEY] = {name: [row[name] for row in rows] for name in rows[0]}  # columns decollate per image
        out.is_batch = True  # decollate_batch then gives each image its own meta, diagnostics included
        return out
