"""The demo: explain the demo classifier's decisions on embedded fundus images, with Grad-CAM beside.

Writes ``panels.png`` (image | known lesion | Med-CAM evidence | Grad-CAM), ``summary.csv`` and
one ``.npy`` mask per image to the output folder.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from monai_medcam import metrics
from monai_medcam.demo.classifier import DEMO_SIZE, demo_classifier
from monai_medcam.demo.known_evidence import make_known_evidence
from monai_medcam.engine import MedCAM, MedCAMResult

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def write_summary_csv(path: Path, result: MedCAMResult, extra: dict[str, list[object]] | None = None) -> Path:
    """One row per image (the result's summary plus ``extra`` columns), written atomically."""
    rows = result.summary()
    for key, values in (extra or {}).items():
        for row, value in zip(rows, values):
            row[key] = value
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def run_demo(
    output: str | Path = "medcam_demo_output", count: int = 4, device: str = "cpu", seed: int = 123, **settings: object
) -> MedCAMResult:
    """Explain ``count`` fundus crops with a lesion and write pictures and a table to ``output``.

    ``settings`` go to :class:`~monai_medcam.MedCAM` (``steps``, ``area_weight``, ...).
    """
    from monai_medcam.visualize import grad_cam, save_panels

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data = make_known_evidence(2 * count, DEMO_SIZE, "retina", seed=seed)
    chosen = np.flatnonzero(data.labels == 1)[:count]
    images = torch.from_numpy(data.images[chosen]).to(device)
    truth = torch.from_numpy(data.lesion_masks[chosen]).to(device)
    classifier = demo_classifier().to(device)

    logger.info("explaining %d fundus images with Med-CAM on %s ...", len(chosen), device)
    result = MedCAM(classifier, **{"progress": True, **settings}).explain(images)
    heatmaps = grad_cam(classifier, images, "layer4", result.label)
    iou = metrics.iou(result.mask.as_tensor(), truth)

    for i in range(len(chosen)):
        tmp = output / f".evidence_{i}.tmp.npy"
        np.save(tmp, result.mask[i, 0].cpu().numpy().astype(np.uint8))
        tmp.replace(output / f"evidence_{i}.npy")
    write_summary_csv(output / "summary.csv", result, {"lesion_iou": [round(float(v), 4) for v in iou]})
    titles = [f"label {int(result.label[i])}, p={float(result.prob_input[i]):.2f}" for i in range(len(chosen))]
    save_panels(
        output / "panels.png",
        images.cpu(),
        {"known lesion": truth.cpu(), "Med-CAM evidence": result.mask.cpu(), "Grad-CAM": heatmaps.cpu()},
        row_titles=titles,
        heatmaps=("Grad-CAM",),
    )
    return result
