"""monai_medcam: Med-CAM minimal evidence masks for frozen medical image classifiers, as a MONAI plugin."""

from __future__ import annotations

from monai_medcam import metrics
from monai_medcam.classifiers import TargetLayer
from monai_medcam.engine import MedCAM, MedCAMResult
from monai_medcam.inferer import MedCAMInferer
from monai_medcam.settings import MedCAMSettings
from monai_medcam.transforms import MedCAMExplain, MedCAMExplaind

__version__ = "0.1.0"

__all__ = ["MedCAM", "MedCAMExplain", "MedCAMExplaind", "MedCAMInferer", "MedCAMResult", "MedCAMSettings", "TargetLayer", "metrics", "__version__"]
