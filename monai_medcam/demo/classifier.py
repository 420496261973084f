"""The demo classifier: a small MONAI ResNet-18 that tells fundus crops with a lesion from those without.

Trained by ``python -m monai_medcam.demo.train`` (that script made the committed checkpoint);
loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import resnet18

__all__ = ["DEMO_CHECKPOINT", "DEMO_SIZE", "build_demo_network", "demo_classifier"]

DEMO_CHECKPOINT = Path(__file__).with_name("demo_classifier.pt")
DEMO_SIZE = 96


def build_demo_network() -> torch.nn.Module:
    """MONAI ResNet-18 at a quarter width: ``(B, 3, 96, 96)`` in [0, 1] -> logits ``(B, 2)``."""
    return resnet18(spatial_dims=2, n_input_channels=3, num_classes=2, widen_factor=0.25)


def demo_classifier(checkpoint: str | Path = DEMO_CHECKPOINT) -> torch.nn.Module:
    """The trained demo classifier in eval mode."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"demo classifier checkpoint {path} not found; run `python -m monai_medcam.demo.train`.")
    network = build_demo_network()
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return network.eval()
