"""Connected components of binary masks, in torch (2D and 3D, batched, on the masks' device).

The engine's pruning step (``prune_components``) drops the components of an evidence mask that the
objective does not need; these functions find them, without a SciPy or scikit-image dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["connected_components", "largest_components"]


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """Label the connected components of binary masks ``(B, 1, *spatial)`` (2 or 3 spatial axes).

    Pixels touching by an edge or a corner (8-connectivity in 2D, 26 in 3D) belong to one component.
    Returns integer labels of the same shape: 0 outside the mask, and each component the same
    positive label, unique within its image (labels need not be consecutive).

    Each foreground pixel starts with its own index and takes the largest label in its
    neighbourhood until nothing changes: as many passes as the longest path inside a component
    from its highest-index pixel (a few for blobs; thousands for a long serpentine).
    """
    if mask.ndim not in (4, 5) or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, H, W[, D]), got {tuple(mask.shape)}.")
    pool = F.max_pool2d if mask.ndim == 4 else F.max_pool3d
    inside = mask > 0.5
    per_image = inside[0].numel()
    dtype = torch.float32 if per_image < 2**24 else torch.float64  # labels exact in the float type (float64: not on MPS)
    index = torch.arange(1, per_image + 1, device=mask.device, dtype=dtype).view(1, *inside.shape[1:])
    labels = torch.where(inside, index, torch.zeros((), device=mask.device, dtype=dtype))
    while True:
        grown = torch.where(inside, pool(labels, 3, stride=1, padding=1), labels)
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def largest_components(labels: torch.Tensor, count: int) -> torch.Tensor:
    """The labels of each image's ``count`` largest components, largest first (equal sizes: the lower
    label first): ``(B, count)``, 0 where an image has fewer. ``labels``: :func:`connected_components`'
    output ``(B, 1, *spatial)``."""
    out = torch.zeros(labels.shape[0], count, dtype=torch.long, device=labels.device)
    for i, image in enumerate(labels.flatten(1)):
        ids, sizes = image[image > 0].unique(return_counts=True)
        order = sizes.argsort(descending=True, stable=True)[:count]
        out[i, : len(order)] = ids[order]
    return out
