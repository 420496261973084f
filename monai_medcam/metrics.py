"""Faithfulness, minimality and localisation metrics for evidence masks and saliency maps.

All functions are batched and work for 2D and 3D: images ``(B, C, *spatial)``, masks and
saliency maps ``(B, 1, *spatial)``; each returns one value per image ``(B,)``. Functions that
run the classifier take it as an ``nn.Module`` and call it under ``torch.no_grad()`` in eval
mode (restored afterwards); a single-logit classifier counts as two classes.

Faithfulness needs no ground truth: :func:`decision_kept`, :func:`decision_kept_under_backgrounds`,
:func:`label_probability`, :func:`insertion_deletion_auc`. Minimality: :func:`area_fraction`,
:func:`non_binary_fraction`. Localisation needs a ground-truth mask: :func:`iou`,
:func:`energy_in_truth` (energy-based pointing game), :func:`pointing_game`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monai_medcam.backgrounds import baseline_image, verification_backgrounds
from monai_medcam.classifiers import FrozenClassifier, class_indices

__all__ = [
    "area_fraction",
    "non_binary_fraction",
    "binarize_top",
    "label_probability",
    "decision_kept",
    "decision_kept_under_backgrounds",
    "insertion_deletion_auc",
    "iou",
    "energy_in_truth",
    "pointing_game",
]


def _check_maps(*maps: torch.Tensor) -> None:
    for m in maps:
        if m.ndim not in (4, 5) or m.shape[1] != 1:
            raise ValueError(f"masks and saliency maps must be (B, 1, H, W[, D]), got {tuple(m.shape)}.")
    if len({tuple(m.shape) for m in maps}) > 1:
        raise ValueError(f"shapes differ: {[tuple(m.shape) for m in maps]}.")


def _check_evidence(x: torch.Tensor, mask: torch.Tensor) -> None:
    """``mask`` ``(B, 1, *spatial)`` must belong to images ``x`` ``(B, C, *spatial)`` (no broadcasting)."""
    _check_maps(mask)
    if x.shape[0] != mask.shape[0] or x.shape[2:] != mask.shape[2:]:
        raise ValueError(f"the masks {tuple(mask.shape)} do not match the images {tuple(x.shape)}: expected "
                         f"({x.shape[0]}, 1, {', '.join(map(str, x.shape[2:]))}).")


def _labels(label: torch.Tensor | int | Sequence[int], x: torch.Tensor) -> torch.Tensor:
    """``label`` as ``(B,)`` class indices on ``x``'s device: one int for all images, or one per image."""
    return class_indices(label, x.shape[0], x.device, "label")


@torch.no_grad()
def _logits(classifier: torch.nn.Module, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    frozen = FrozenClassifier(classifier, [])
    with frozen.frozen():
        return torch.cat([frozen.logits(x[i : i + chunk]).float() for i in range(0, len(x), chunk)])


def area_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of pixels in the (binarised at 0.5) mask ``(B,)``."""
    _check_maps(mask)
    return (mask > 0.5).float().flatten(1).mean(1)


def non_binary_fraction(mask: torch.Tensor, tol: float = 0.01) -> torch.Tensor:
    """Share of mask values farther than ``tol`` from both 0 and 1 ``(B,)``."""
    _check_maps(mask)
    return ((mask > tol) & (mask < 1 - tol)).float().flatten(1).mean(1)


def binarize_top(saliency: torch.Tensor, area: torch.Tensor | float) -> torch.Tensor:
    """Binary masks keeping each image's ``area`` fraction of most salient pixels ``(B, 1, *spatial)``.

    ``area`` is one fraction for all images or one per image ``(B,)`` (e.g. Med-CAM's evidence
    area, to compare a saliency method at equal area). Ties are broken by position.
    """
    _check_maps(saliency)
    flat = saliency.flatten(1).float()
    count = flat.shape[1]
    area = torch.as_tensor(area, dtype=torch.float, device=flat.device).expand(flat.shape[0])
    keep = (area * count).round().long().clamp(0, count)
    order = flat.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(count, device=flat.device).expand_as(order))
    return (rank < keep[:, None]).float().view_as(saliency)


def label_probability(classifier: torch.nn.Module, x: torch.Tensor, label: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
    """Softmax probability of ``label`` (one class, or one per image) on images ``x`` ``(B,)``: the
    confidence on the input or on evidence."""
    label = _labels(label, x)
    return torch.softmax(_logits(classifier, x), 1).gather(1, label[:, None])[:, 0]


def decision_kept(
    classifier: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, label: torch.Tensor | int | Sequence[int], baseline: str = "zeros"
) -> torch.Tensor:
    """``(B,)`` bool: the classifier gives ``label`` on the binary evidence ``m x + (1 - m) baseline``."""
    _check_evidence(x, mask)
    label = _labels(label, x)
    hard = (mask > 0.5).to(x.dtype)
    evidence = hard * x + (1 - hard) * baseline_image(x, baseline)
    return _logits(classifier, evidence).argmax(1) == label


def decision_kept_under_backgrounds(
    classifier: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, label: torch.Tensor | int | Sequence[int], k: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """Fraction of K random backgrounds ``r`` for which ``m x + (1 - m) r`` keeps ``label`` ``(B,)``.

    The backgrounds are those of ``MedCAM``'s verification
    (:func:`~monai_medcam.backgrounds.verification_backgrounds`): a blurred copy of the image,
    then Gaussian and uniform noise in turn.
    """
    _check_evidence(x, mask)
    label = _labels(label, x)
    if k < 1:
        raise ValueError(f"k must be at least 1 background, got {k}.")
    hard = (mask > 0.5).to(x.dtype)
    kept = [(_logits(classifier, hard * x + (1 - hard) * r).argmax(1) == label).float() for r in verification_backgrounds(x, k, seed)]
    return torch.stack(kept).mean(0)


def insertion_deletion_auc(
    classifier: torch.nn.Module,
    x: torch.Tensor,
    saliency: torch.Tensor,
    label: torch.Tensor,
    steps: int = 32,
    baseline: str = "blur",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RISE-style insertion and deletion AUC ``(B,), (B,)`` of the label's probability.

    Pixels are taken in order of decreasing saliency, ``1/steps`` of them at a time. Deletion
    replaces them by the baseline in the image (lower is better); insertion puts them into the
    baseline (higher is better). The AUC is the mean probability over the ``steps + 1`` points.
    """
    _check_evidence(x, saliency)
    base = baseline_image(x, baseline)
    insertion, deletion = [], []
    for j in range(steps + 1):
        shown = binarize_top(saliency, j / steps).to(x.dtype)
        insertion.append(label_probability(classifier, shown * x + (1 - shown) * base, label))
        deletion.append(label_probability(classifier, (1 - shown) * x + shown * base, label))
    return torch.stack(insertion).mean(0), torch.stack(deletion).mean(0)


def iou(mask: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Intersection over union of binary mask and ground truth ``(B,)`` (0 when both are empty)."""
    _check_maps(mask, truth)
    m, t = mask > 0.5, truth > 0.5
    inter = (m & t).flatten(1).sum(1).float()
    union = (m | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def energy_in_truth(saliency: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game: share of the (non-negative) saliency inside the ground truth ``(B,)``."""
    _check_maps(saliency, truth)
    s = saliency.float().clamp_min(0).flatten(1)
    return (s * (truth > 0.5).flatten(1)).sum(1) / s.sum(1).clamp_min(1e-12)


def pointing_game(saliency: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the most salient pixel lies inside the ground truth."""
    _check_maps(saliency, truth)
    top = saliency.flatten(1).argmax(1)
    return (truth > 0.5).flatten(1).gather(1, top[:, None])[:, 0]
