"""What replaces the pixels outside the evidence mask: baselines and random backgrounds.

A *baseline* is what "removed" means for the evidence ``e = m * x + (1 - m) * baseline``
(``"zeros"`` gives the paper's ``e = m * x``). A *background* ``r`` is random content for the
robustness term and for verification: ``m * x + (1 - m) * r`` must keep the decision.

Random backgrounds draw one noise pattern ``(1, C, *spatial)`` and scale it with each image's own
statistics, so image ``i``'s background never depends on the other images of the batch (the
``"batch"`` kind, another image of the batch, is the one deliberate exception).
"""

from __future__ import annotations

import torch
from monai.networks.layers import GaussianFilter

__all__ = ["BASELINES", "BACKGROUNDS", "blurred", "baseline_image", "random_background", "verification_backgrounds"]

BASELINES = ("zeros", "mean", "blur")
BACKGROUNDS = ("gaussian", "uniform", "blur", "zeros", "batch")


def blurred(x: torch.Tensor, sigma_fraction: float = 0.05) -> torch.Tensor:
    """A heavily blurred copy of ``x`` ``(B, C, *spatial)``; sigma is a fraction of the smallest side."""
    sigma = max(1.0, sigma_fraction * min(x.shape[2:]))
    blur = GaussianFilter(spatial_dims=x.ndim - 2, sigma=sigma, truncated=3.0).to(x.device)
    with torch.no_grad():
        return blur(x.float()).to(x.dtype)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    flat = x.flatten(2)
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    return (
        flat.mean(2).reshape(shape),
        flat.std(2, unbiased=False).reshape(shape),
        flat.amin(2).reshape(shape),
        flat.amax(2).reshape(shape),
    )


def baseline_image(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The baseline for removed pixels, same shape as ``x`` ``(B, C, *spatial)``."""
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "mean":
        return _channel_stats(x)[0].expand_as(x).clone()
    if kind == "blur":
        return blurred(x)
    raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}.")


def random_background(x: torch.Tensor, kind: str, generator: torch.Generator, x_blurred: torch.Tensor | None = None) -> torch.Tensor:
    """Random content ``r`` of the same shape as ``x`` ``(B, C, *spatial)``.

    ``"gaussian"``: per-image, per-channel mean and standard deviation of ``x``;
    ``"uniform"``: uniform in each image's per-channel range; ``"blur"``: a blurred copy;
    ``"zeros"``: zeros; ``"batch"``: the next image of the batch (Gaussian noise for a batch of one).
    """
    shape = (1,) + tuple(x.shape[1:])
    if kind == "batch":
        if x.shape[0] > 1:
            return x.roll(1, dims=0)
        kind = "gaussian"
    if kind == "gaussian":
        mean, std, _, _ = _channel_stats(x)
        noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + std * noise
    if kind == "uniform":
        _, _, low, high = _channel_stats(x)
        noise = torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)
        return low + (high - low) * noise
    if kind == "blur":
        return blurred(x) if x_blurred is None else x_blurred
    if kind == "zeros":
        return torch.zeros_like(x)
    raise ValueError(f"background must be one of {BACKGROUNDS}, got {kind!r}.")


def verification_backgrounds(x: torch.Tensor, count: int, seed: int, x_blurred: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The ``count`` backgrounds a binary evidence mask must survive, each shaped like ``x``.

    A blurred copy first, then Gaussian and uniform noise in turn, drawn afresh from ``seed``, so
    a check never depends on when it is made. ``MedCAM``'s ``verified`` and
    :func:`monai_medcam.metrics.decision_kept_under_backgrounds` both use these.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)
    x_blurred = blurred(x) if x_blurred is None else x_blurred
    kinds = ["blur"] + [("gaussian", "uniform")[k % 2] for k in range(count - 1)]
    return [random_background(x, kind, generator, x_blurred) for kind in kinds[:count]]
