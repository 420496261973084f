"""Tiny classifiers and images with known evidence, shared by the tests."""

from __future__ import annotations

import torch
import torch.nn as nn


class RegionClassifier(nn.Module):
    """A CNN whose decision depends only on a known region of the image.

    Class 1 when the mean of ``relu(conv(x))`` inside ``region`` exceeds ``threshold``; pixels
    outside the region (beyond the 3x3 receptive field) cannot change the logits.
    """

    def __init__(self, size: int = 32, region: tuple[slice, slice] = (slice(8, 16), slice(8, 16)), channels: int = 1,
                 threshold: float = 0.4, spatial_dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv = conv(channels, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = conv(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / (9 * channels * (3 if spatial_dims == 3 else 1)))
            self.conv.bias.zero_()
            self.conv2.weight.zero_()
            for c in range(4):
                self.conv2.weight[(c, c) + (1,) * spatial_dims] = 1.0
            self.conv2.bias.zero_()
        window = torch.zeros((size,) * spatial_dims)
        window[region if spatial_dims == 2 else region + (region[0],)] = 1.0
        self.register_buffer("window", window)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.relu2(self.conv2(self.relu(self.conv(x))))
        score = (f.mean(1) * self.window).flatten(1).sum(1) / self.window.sum()
        return torch.stack([self.threshold - score, score - self.threshold], dim=1) * 20


def region_images(count: int = 2, size: int = 32, channels: int = 1, seed: int = 0,
                  region: tuple[slice, slice] = (slice(8, 16), slice(8, 16))) -> torch.Tensor:
    """Noisy images ``(count, channels, size, size)`` with a bright square in ``region`` (class 1)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(count, channels, size, size, generator=g)
    x[(slice(None), slice(None)) + region] += 0.8
    return x


class LesionColourClassifier(nn.Module):
    """A tile classifier that says "lesion" (class 1) when enough yellow lesion-coloured pixels are present.

    Yellowness is ``relu(R + G - 2B - 0.6)`` (the demo slide's lesions: about 0.68; IHC stain and
    glass: below 0.57 for 99.9% of pixels), computed by a 1x1 convolution, so the decision depends
    on those pixels alone: class 1 when their summed yellowness exceeds ``threshold``.
    """

    def __init__(self, threshold: float = 1.5) -> None:
        super().__init__()
        self.colour = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.colour.weight.copy_(torch.tensor([1.0, 1.0, -2.0]).reshape(1, 3, 1, 1))
            self.colour.bias.fill_(-0.6)
        self.relu = nn.ReLU()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.relu(self.colour(x)).flatten(1).sum(1)
        return torch.stack([torch.full_like(score, self.threshold), score], dim=1) * 4


def fixed_size_tile_classifier() -> nn.Module:
    """A tile classifier that takes 64-pixel RGB tiles only (a Linear over the flattened tile)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 2))


def small_gpu_optimise(most: int, sizes: list[int]):
    """A stand-in for ``MedCAM._optimise`` on a GPU that holds at most ``most`` images' optimisation:
    appends each part's size to ``sizes`` and raises CUDA's out-of-memory error above ``most``."""
    from monai_medcam import MedCAM

    optimise = MedCAM._optimise

    def small_gpu(self, x, *args):
        sizes.append(x.shape[0])
        if x.shape[0] > most:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return optimise(self, x, *args)

    return small_gpu
