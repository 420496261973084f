"""The demo classifiers: small MONAI ResNet-18s that tell images with a lesion from those without.

- fundus: RGB fundus crops at 96 px (``demo_classifier``);
- radiology: grayscale MR, CT, CR, ultrasound and fundus crops at 64 px (``radiology_classifier``);
- histology: RGB tiles of an IHC-stained section at 64 px (``histology_classifier``), for whole slides.

Trained by ``python -m monai_medcam.demo.train --kind fundus|radiology|histology`` (that script made the
committed checkpoints); loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import resnet18

__all__ = [
    "DEMO_CHECKPOINT",
    "DEMO_SIZE",
    "RADIOLOGY_CHECKPOINT",
    "RADIOLOGY_SIZE",
    "HISTOLOGY_CHECKPOINT",
    "HISTOLOGY_SIZE",
    "CLASS_NAMES",
    "build_demo_network",
    "build_histology_network",
    "histology_classifier",
    "build_radiology_network",
    "demo_classifier",
    "radiology_classifier",
]

DEMO_CHECKPOINT = Path(__file__).with_name("demo_classifier.pt")
DEMO_SIZE = 96
RADIOLOGY_CHECKPOINT = Path(__file__).with_name("radiology_classifier.pt")
RADIOLOGY_SIZE = 64
HISTOLOGY_CHECKPOINT = Path(__file__).with_name("histology_classifier.pt")
HISTOLOGY_SIZE = 64
CLASS_NAMES = ("no lesion", "lesion")  # every demo classifier: class 1 is "a lesion is in the image"


def build_demo_network() -> torch.nn.Module:
    """MONAI ResNet-18 at a quarter width: ``(B, 3, 96, 96)`` in [0, 1] -> logits ``(B, 2)``."""
    return resnet18(spatial_dims=2, n_input_channels=3, num_classes=2, widen_factor=0.25)


def build_radiology_network() -> torch.nn.Module:
    """MONAI ResNet-18 at a quarter width: ``(B, 1, 64, 64)`` in [0, 1] -> logits ``(B, 2)``."""
    return resnet18(spatial_dims=2, n_input_channels=1, num_classes=2, widen_factor=0.25)


def build_histology_network() -> torch.nn.Module:
    """MONAI ResNet-18 at a quarter width: ``(B, 3, 64, 64)`` RGB tiles in [0, 1] -> logits ``(B, 2)``."""
    return resnet18(spatial_dims=2, n_input_channels=3, num_classes=2, widen_factor=0.25)


def histology_classifier(checkpoint: str | Path = HISTOLOGY_CHECKPOINT) -> torch.nn.Module:
    """The trained histology tile demo classifier in eval mode."""
    return _load(build_histology_network(), checkpoint, "histology")


def radiology_classifier(checkpoint: str | Path = RADIOLOGY_CHECKPOINT) -> torch.nn.Module:
    """The trained grayscale radiology demo classifier in eval mode."""
    return _load(build_radiology_network(), checkpoint, "radiology")


def demo_classifier(checkpoint: str | Path = DEMO_CHECKPOINT) -> torch.nn.Module:
    """The trained fundus demo classifier in eval mode."""
    return _load(build_demo_network(), checkpoint, "fundus")


def _load(network: torch.nn.Module, checkpoint: str | Path, kind: str) -> torch.nn.Module:
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"demo classifier checkpoint {path} not found; run `python -m monai_medcam.demo.train --kind {kind}`.")
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return network.eval()
