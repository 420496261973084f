"""The terms of the Med-CAM objective (paper section 3), each small and separately tested.

Every loss returns one value per image with ``reduction="none"`` so that a batch of
independent explainers can be optimised together: the sum of per-image losses has, for each
image's own mask network, exactly that image's gradient.

    L = act_weight * ActivationMatchingLoss + kl_weight * OutputKLLoss + ce_weight * CE
      + area_weight * AreaLoss + bin_weight * BinarizationLoss + tv_weight * TotalVariationLoss
      + rob_weight * CE(f(m * x + (1 - m) * r), y)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai_medcam.classifiers import TargetLayer

__all__ = [
    "AreaLoss",
    "BinarizationLoss",
    "TotalVariationLoss",
    "ActivationMatchingLoss",
    "OutputKLLoss",
    "DecisionLoss",
    "straight_through_binary",
]


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f'reduction must be "none", "mean" or "sum", got {reduction!r}.')


def _check_mask(mask: torch.Tensor) -> None:
    if mask.ndim not in (4, 5) or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, H, W[, D]), got {tuple(mask.shape)}.")


def straight_through_binary(soft_mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Hard mask ``soft_mask > threshold`` in the forward pass, identity gradient in the backward pass."""
    hard = (soft_mask > threshold).to(soft_mask.dtype)
    return hard + soft_mask - soft_mask.detach()


class AreaLoss(_Loss):
    """Evidence area ``|m|_1`` as the mean mask value per image, in [0, 1].

    Input ``(B, 1, *spatial)``; output ``(B,)`` with ``reduction="none"``.
    """

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        _check_mask(mask)
        return _reduce(mask.flatten(1).mean(1), self.reduction)


class BinarizationLoss(_Loss):
    """Crispness ``|m - m^2|_1``, the mean of ``m (1 - m)`` per image, in [0, 0.25]."""

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        _check_mask(mask)
        return _reduce((mask * (1 - mask)).flatten(1).mean(1), self.reduction)


class TotalVariationLoss(_Loss):
    """Anisotropic total variation: per spatial axis the mean ``|m_i - m_{i+1}|``, summed over axes.

    Input ``(B, 1, H, W[, D])``; output ``(B,)`` with ``reduction="none"``.
    """

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        _check_mask(mask)
        total = mask.new_zeros(mask.shape[0])
        for axis in range(2, mask.ndim):
            if mask.shape[axis] > 1:
                total = total + mask.diff(dim=axis).abs().flatten(1).mean(1)
        return _reduce(total, self.reduction)


class ActivationMatchingLoss(_Loss):
    """Weighted distance between the classifier's activations on the image and on the evidence.

    ``sum_l alpha_l d(phi_l(x), phi_l(e))`` over the target layers. Each distance is normalised
    so that layers are comparable: ``"mse"`` is the mean squared difference divided by the
    reference's mean square (a relative MSE: 1 when the evidence's activations are all zero);
    ``"cosine"`` is ``1 - cos`` between the flattened maps. The sum is divided by the sum of the
    weights.

    A per-channel standardisation (each channel divided by its spatial standard deviation) was
    tried first: near-constant channels then dominate the loss and hold the mask open.

    Args:
        layers: the target layers, giving each layer's weight and distance.
        eps: floor of the reference's mean square.
    """

    def __init__(self, layers: Sequence[TargetLayer], eps: float = 1e-8, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.layers = list(layers)
        self.eps = eps

    def forward(self, reference: Sequence[torch.Tensor], evidence: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(reference) != len(self.layers) or len(evidence) != len(self.layers):
            raise ValueError(
                f"expected {len(self.layers)} activations per input, got {len(reference)} (reference) "
                f"and {len(evidence)} (evidence)."
            )
        if not self.layers:
            raise ValueError("ActivationMatchingLoss needs at least one target layer.")
        total = None
        for layer, ref, evi in zip(self.layers, reference, evidence):
            if ref.shape != evi.shape:
                raise ValueError(f"layer {layer.name!r}: reference {tuple(ref.shape)} vs evidence {tuple(evi.shape)}.")
            ref, evi = ref.float(), evi.float()
            if layer.distance == "cosine":
                dist = 1 - F.cosine_similarity(ref.flatten(1), evi.flatten(1), dim=1, eps=1e-8)
            else:
                energy = ref.pow(2).flatten(1).mean(1).clamp_min(self.eps)
                dist = (evi - ref).pow(2).flatten(1).mean(1) / energy
            term = layer.weight * dist
            total = term if total is None else total + term
        weight_sum = sum(layer.weight for layer in self.layers) or 1.0
        return _reduce(total / weight_sum, self.reduction)


class OutputKLLoss(_Loss):
    """``KL(softmax(z_x / T) || softmax(z_e / T))`` per image, with temperature ``T``.

    Args:
        temperature: softens both distributions so the loss still carries signal when the
            classifier is very confident.
    """

    def __init__(self, temperature: float = 2.0, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = temperature

    def forward(self, logits_reference: torch.Tensor, logits_evidence: torch.Tensor) -> torch.Tensor:
        if logits_reference.shape != logits_evidence.shape or logits_reference.ndim != 2:
            raise ValueError(
                f"logits must both be (B, K): got {tuple(logits_reference.shape)} and {tuple(logits_evidence.shape)}."
            )
        log_p = F.log_softmax(logits_reference.float() / self.temperature, dim=1)
        log_q = F.log_softmax(logits_evidence.float() / self.temperature, dim=1)
        return _reduce((log_p.exp() * (log_p - log_q)).sum(1), self.reduction)


class DecisionLoss(_Loss):
    """Cross-entropy ``-log p_f(e)(y)`` of the explained label, per image (also the robustness term)."""

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or label.shape != logits.shape[:1]:
            raise ValueError(f"logits must be (B, K) and label (B,): got {tuple(logits.shape)} and {tuple(label.shape)}.")
        return _reduce(F.cross_entropy(logits.float(), label, reduction="none"), self.reduction)
