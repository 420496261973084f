"""Faithfulness, minimality and localisation metrics for evidence masks and saliency maps.

All functions are batched and work for 2D and 3D: images ``(B, C, *spatial)``, masks and
saliency maps ``(B, 1, *spatial)``; each returns one value per image ``(B,)``. Functions that
run the classifier take it as an ``nn.Module`` and call it under ``torch.no_grad()`` in eval
mode (restored afterwards); a single-logit classifier counts as two classes, and a label it does
not have is a ``ValueError``. MetaTensors come out as plain tensors; integer images are taken as
floats.

Faithfulness needs no ground truth: :func:`decision_kept`, :func:`decision_kept_under_backgrounds`,
:func:`label_probability`, :func:`insertion_deletion_auc`. Minimality: :func:`area_fraction`,
:func:`non_binary_fraction`. Localisation needs a ground-truth mask: :func:`iou`,
:func:`energy_in_truth` (energy-based pointing game), :func:`pointing_game`; each gives NaN for an
image whose ground truth is empty (localisation is undefined there, as with MONAI's
``compute_iou(ignore_empty=True)``): average with ``torch.nanmean``.

Ties in a saliency map (a near-binary mask, a blocky occlusion map) are broken in a seeded random
order (:func:`binarize_top`, :func:`insertion_deletion_auc`) or at the centre of the tied maxima
(:func:`pointing_game`), never by position in the array, which would favour one side of the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import MetaTensor

from monai_medcam.backgrounds import baseline_image, verification_backgrounds
from monai_medcam.classifiers import FrozenClassifier, class_indices
from monai_medcam.settings import is_whole_number

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


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor (per-image results carry no image metadata)."""
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def _check_maps(**maps: torch.Tensor) -> list[torch.Tensor]:
    """The maps ``(B, 1, *spatial)``, named by their argument in any error; plain, on the first one's device."""
    out = []
    for name, m in maps.items():
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name} must be a tensor (B, 1, H, W[, D]), got {type(m).__name__}.")
        if m.ndim not in (4, 5) or m.shape[1] != 1:
            raise ValueError(f"{name} must be (B, 1, H, W[, D]) like every mask and saliency map, got {tuple(m.shape)}.")
        if m.shape[0] == 0:
            raise ValueError(f"{name} holds no images (batch size 0).")
        m = _plain(m)
        out.append(m.to(out[0].device) if out else m)
    if len({tuple(m.shape) for m in out}) > 1:
        raise ValueError(f"shapes differ: {', '.join(f'{n} {tuple(m.shape)}' for n, m in zip(maps, out))}.")
    return out


def _ranked(saliency: torch.Tensor) -> torch.Tensor:
    """``saliency`` flattened ``(B, N)`` as floats; a NaN would rank first or last at random: refused."""
    flat = saliency.flatten(1).float()
    if not torch.isfinite(flat).all():
        raise ValueError("saliency holds NaN or infinite values; they have no rank.")
    return flat


def _check_evidence(x: torch.Tensor, mask: torch.Tensor, name: str = "mask") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``x`` ``(B, C, *spatial)`` as floats and their ``mask`` ``(B, 1, *spatial)`` (no
    broadcasting) on ``x``'s device, plain tensors."""
    x = _images(x)
    (mask,) = _check_maps(**{name: mask})
    if x.shape[0] != mask.shape[0] or x.shape[2:] != mask.shape[2:]:
        raise ValueError(f"{name} {tuple(mask.shape)} does not match the images {tuple(x.shape)}: expected "
                         f"({x.shape[0]}, 1, {', '.join(map(str, x.shape[2:]))}).")
    return x, mask.to(x.device)


def _images(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor of images (B, C, H, W[, D]), got {type(x).__name__}.")
    if x.ndim not in (4, 5) or x.shape[0] == 0:
        raise ValueError(f"x must be images (B, C, H, W[, D]) with B >= 1, got {tuple(x.shape)}.")
    x = _plain(x)
    return x if x.is_floating_point() else x.float()


def _labels(label: torch.Tensor | int | Sequence[int], logits: torch.Tensor) -> torch.Tensor:
    """``label`` as ``(B,)`` class indices of ``logits`` ``(B, K)``, on their device: one int for all
    images, or one per image; a class the classifier does not have is a ``ValueError``."""
    return class_indices(label, logits.shape[0], logits.device, "label", classes=logits.shape[1])


def _count(value: object, name: str, least: int) -> int:
    if not is_whole_number(value) or value < least:
        raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}.")
    return int(value)


@torch.no_grad()
def _logits(classifier: torch.nn.Module, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    frozen = FrozenClassifier(classifier, [])
    with frozen.frozen():
        return torch.cat([_plain(frozen.logits(x[i : i + chunk])).float() for i in range(0, len(x), chunk)])


def area_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of pixels in the (binarised at 0.5) mask ``(B,)``."""
    (mask,) = _check_maps(mask=mask)
    return (mask > 0.5).float().flatten(1).mean(1)


def non_binary_fraction(mask: torch.Tensor, tol: float = 0.01) -> torch.Tensor:
    """Share of mask values farther than ``tol`` (in [0, 0.5)) from both 0 and 1 ``(B,)``."""
    (mask,) = _check_maps(mask=mask)
    if not 0 <= tol < 0.5:
        raise ValueError(f"tol must lie in [0, 0.5), got {tol!r}.")
    return ((mask > tol) & (mask < 1 - tol)).float().flatten(1).mean(1)


def binarize_top(saliency: torch.Tensor, area: torch.Tensor | float, seed: int | None = 0) -> torch.Tensor:
    """Binary masks keeping each image's ``area`` fraction of most salient pixels ``(B, 1, *spatial)``.

    ``area`` is one fraction in [0, 1] for all images or one per image ``(B,)`` (e.g. Med-CAM's
    evidence area, to compare a saliency method at equal area). Ties are broken in a random order
    drawn from ``seed`` (the same for every call, so that larger areas hold the smaller ones);
    ``None`` breaks them by position in the array (first pixels first).
    """
    (saliency,) = _check_maps(saliency=saliency)
    return _top(_salience_rank(saliency, seed), area).view_as(saliency)


def _salience_rank(saliency: torch.Tensor, seed: int | None) -> torch.Tensor:
    """``(B, N)``: each pixel's place in its image's order of decreasing saliency (0 the most
    salient); ties in a random order drawn from ``seed``, or by position for ``None``."""
    flat = _ranked(saliency)
    count = flat.shape[1]
    if seed is None:
        order = flat.argsort(dim=1, descending=True, stable=True)
    else:  # shuffled first, then a stable sort: tied pixels stay in the shuffled order
        shuffle = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).to(flat.device)
        order = shuffle[flat[:, shuffle].argsort(dim=1, descending=True, stable=True)]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(count, device=flat.device).expand_as(order))
    return rank


def _top(rank: torch.Tensor, area: torch.Tensor | float) -> torch.Tensor:
    """``(B, N)`` float: the pixels of ``rank`` (:func:`_salience_rank`) among each image's ``area`` most salient."""
    batch, count = rank.shape
    area = torch.as_tensor(area, dtype=torch.float, device=rank.device).flatten()
    if area.numel() not in (1, batch) or not torch.isfinite(area).all() or ((area < 0) | (area > 1)).any():
        raise ValueError(f"area must be one fraction in [0, 1] or one per image ({batch}), got {area.tolist()}.")
    keep = (area.expand(batch) * count).round().long().clamp(0, count)
    return (rank < keep[:, None]).float()


def label_probability(classifier: torch.nn.Module, x: torch.Tensor, label: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
    """Softmax probability of ``label`` (one class, or one per image) on images ``x`` ``(B,)``: the
    confidence on the input or on evidence."""
    logits = _logits(classifier, _images(x))
    return torch.softmax(logits, 1).gather(1, _labels(label, logits)[:, None])[:, 0]


def decision_kept(
    classifier: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, label: torch.Tensor | int | Sequence[int], baseline: str = "zeros"
) -> torch.Tensor:
    """``(B,)`` bool: the classifier gives ``label`` on the binary evidence ``m x + (1 - m) baseline``."""
    x, mask = _check_evidence(x, mask)
    hard = (mask > 0.5).to(x.dtype)
    logits = _logits(classifier, hard * x + (1 - hard) * baseline_image(x, baseline))
    return logits.argmax(1) == _labels(label, logits)


def decision_kept_under_backgrounds(
    classifier: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, label: torch.Tensor | int | Sequence[int], k: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """Fraction of K random backgrounds ``r`` for which ``m x + (1 - m) r`` keeps ``label`` ``(B,)``.

    The backgrounds are those of ``MedCAM``'s verification
    (:func:`~monai_medcam.backgrounds.verification_backgrounds`): a blurred copy of the image,
    then Gaussian and uniform noise in turn.
    """
    x, mask = _check_evidence(x, mask)
    if not is_whole_number(k) or k < 1:
        raise ValueError(f"k must be at least 1 background (a whole number), got {k!r}.")
    hard = (mask > 0.5).to(x.dtype)
    kept = []
    for r in verification_backgrounds(x, int(k), seed):
        logits = _logits(classifier, hard * x + (1 - hard) * r)
        kept.append((logits.argmax(1) == _labels(label, logits)).float())
    return torch.stack(kept).mean(0)


def insertion_deletion_auc(
    classifier: torch.nn.Module,
    x: torch.Tensor,
    saliency: torch.Tensor,
    label: torch.Tensor | int | Sequence[int],
    steps: int = 32,
    baseline: str | tuple[str, str] = "blur",
    seed: int | None = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insertion and deletion AUC ``(B,), (B,)`` of the label's probability (Petsiuk et al., RISE, 2018).

    Pixels are taken in order of decreasing saliency (ties in a random order drawn from ``seed``,
    as :func:`binarize_top`), ``1/steps`` of them at a time. Deletion replaces them by the baseline
    in the image (lower is better); insertion puts them into the baseline (higher is better). The
    AUC is the trapezoidal area under the ``steps + 1`` points over a unit axis, as RISE's. RISE
    inserts into a blurred image and deletes to zeros: ``baseline=("blur", "zeros")``; one name
    serves both (``"blur"`` by default: zeros are not neutral for every classifier's inputs).
    """
    x, saliency = _check_evidence(x, saliency, "saliency")
    steps = _count(steps, "steps", 1)
    inserted_into, deleted_to = (baseline, baseline) if isinstance(baseline, str) else tuple(baseline)
    into, to = baseline_image(x, inserted_into), baseline_image(x, deleted_to)
    rank = _salience_rank(saliency, seed)  # one order for every step: the shown sets are nested
    insertion, deletion = [], []
    for j in range(steps + 1):
        shown = _top(rank, j / steps).view_as(saliency).to(x.dtype)
        insertion.append(label_probability(classifier, shown * x + (1 - shown) * into, label))
        deletion.append(label_probability(classifier, (1 - shown) * x + shown * to, label))

    def area(points: list[torch.Tensor]) -> torch.Tensor:
        p = torch.stack(points)
        return (p.sum(0) - (p[0] + p[-1]) / 2) / steps

    return area(insertion), area(deletion)


def iou(mask: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Intersection over union of binary mask and ground truth ``(B,)``; NaN where the truth is empty."""
    mask, truth = _check_maps(mask=mask, truth=truth)
    m, t = mask > 0.5, truth > 0.5
    inter = (m & t).flatten(1).sum(1).float()
    union = (m | t).flatten(1).sum(1).float()
    return torch.where(t.flatten(1).any(1), inter / union.clamp_min(1), torch.nan)


def energy_in_truth(saliency: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game: share of the (non-negative) saliency inside the ground truth
    ``(B,)``, whatever the map's scale; 0 for a map with no positive value, NaN where the truth is empty."""
    saliency, truth = _check_maps(saliency=saliency, truth=truth)
    s = _ranked(saliency).clamp_min(0)
    peak = s.amax(1, keepdim=True)
    s = s / torch.where(peak > 0, peak, 1.0)  # peak 1: no sum overflows or underflows
    t = (truth > 0.5).flatten(1)
    share = (s * t).sum(1) / s.sum(1).clamp_min(1.0)  # a sum of at least the peak's 1, or 0 for an all-zero map
    return torch.where(t.any(1), share, torch.nan)


def pointing_game(saliency: torch.Tensor, truth: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """Pointing game (Zhang et al. 2018): 1.0 where the map's most salient point lies within
    ``tolerance`` pixels (Euclidean; they used 15 at 224 px) of the ground truth, else 0.0 ``(B,)``.

    Where several pixels share the maximum (a near-binary mask, a blocky map), the point is the
    tied pixel nearest their centroid; a constant map points nowhere (0.0). NaN where the truth is
    empty. The mean over images (``torch.nanmean``) is the hit rate.
    """
    saliency, truth = _check_maps(saliency=saliency, truth=truth)
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a distance in pixels >= 0, got {tolerance!r}.")
    s, t = _ranked(saliency), (truth > 0.5).flatten(1)
    grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float, device=s.device) for n in saliency.shape[2:]], indexing="ij")
    coords = torch.stack(grid, -1).reshape(-1, saliency.ndim - 2)  # (N, spatial dims)
    hits = torch.full((s.shape[0],), torch.nan, dtype=torch.float32, device=s.device)
    for i in range(s.shape[0]):
        if not t[i].any():
            continue
        top = s[i] == s[i].max()
        if top.all():
            hits[i] = 0.0
            continue
        tied = coords[top]
        point = tied[((tied - tied.mean(0)) ** 2).sum(1).argmin()]
        hits[i] = float(((coords[t[i]] - point) ** 2).sum(1).min() <= tolerance**2)
    return hits
