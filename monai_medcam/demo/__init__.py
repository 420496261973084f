"""Embedded demo: known-evidence images on real backgrounds and a small committed classifier."""

from __future__ import annotations

from monai_medcam.demo.classifier import DEMO_CHECKPOINT, demo_classifier
from monai_medcam.demo.known_evidence import KnownEvidence, make_known_evidence

__all__ = ["DEMO_CHECKPOINT", "demo_classifier", "KnownEvidence", "make_known_evidence"]
