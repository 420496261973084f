"""The demo, on embedded data only.

- :func:`run_demo`: the fundus demo classifier on known-evidence fundus crops; writes
  ``panels.png`` (image | known lesion | Med-CAM evidence | Grad-CAM), ``summary.csv`` and one
  ``.npy`` mask per image.
- :func:`run_radiology_demo`: the whole radiology path: demo studies (a DICOM MR series, a DICOM
  radiograph, a NIfTI volume, a fundus PNG) explained by the grayscale demo classifier, evidence
  written as DICOM SEG, NIfTI and PNG panels, plus ``summary.csv``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from monai_medcam import metrics
from monai_medcam.demo.classifier import CLASS_NAMES, DEMO_SIZE, demo_classifier
from monai_medcam.demo.known_evidence import make_known_evidence
from monai_medcam.engine import MedCAM, MedCAMResult
from monai_medcam.writers import atomic_path

__all__ = ["run_demo", "run_radiology_demo", "lesion_overlap", "LesionOverlap"]

logger = logging.getLogger(__name__)


def write_summary_csv(path: Path, result: MedCAMResult, extra: dict[str, list[object]] | None = None) -> Path:
    """One row per image (the result's summary plus ``extra`` columns), written atomically."""
    rows = result.summary()
    for key, values in (extra or {}).items():
        for row, value in zip(rows, values):
            row[key] = value
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def run_demo(
    output: str | Path = "medcam_demo_output", count: int = 4, device: str = "cpu", seed: int = 123, **settings: object
) -> MedCAMResult:
    """Explain ``count`` fundus crops with a lesion and write pictures and a table to ``output``.

    ``settings`` go to :class:`~monai_medcam.MedCAM` (``steps``, ``area_weight``, ...).
    """
    from monai_medcam.visualize import evidence_caption, grad_cam, save_panels

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
        with atomic_path(output / f"evidence_{i}.npy") as tmp:  # the temporary name ends in .npy too
            np.save(tmp, result.mask[i, 0].cpu().numpy().astype(np.uint8))
    write_summary_csv(output / "summary.csv", result, {"lesion_iou": [round(float(v), 4) for v in iou]})
    captions = [evidence_caption(row, dict(enumerate(CLASS_NAMES))) for row in result.summary()]
    save_panels(
        output / "panels.png",
        images.cpu(),
        {"known lesion": truth.cpu(), "Med-CAM evidence": result.mask.cpu(), "Grad-CAM": heatmaps.cpu()},
        row_titles=[c[0] for c in captions],
        heatmaps=("Grad-CAM",),
        notes={"Med-CAM evidence": [c[1:] for c in captions]},
    )
    return result


@dataclass
class LesionOverlap:
    """How an input's evidence meets its known lesion (slices: those of a volume, or the one 2D image).

    Attributes:
        on_lesion: share of the evidence in the slices with the lesion that lies on the lesion.
        lesion_slices: slices with the lesion.
        lesion_free_slices: slices without it...
        lesion_free_with_evidence: ...of which hold evidence (the classifier called them "lesion":
            their evidence shows what it decided from).
    """

    on_lesion: float
    lesion_slices: int
    lesion_free_slices: int
    lesion_free_with_evidence: int

    def __str__(self) -> str:
        text = f"{self.on_lesion:.0%} of the evidence lies on the known lesion"
        if self.lesion_slices + self.lesion_free_slices > 1:
            text += (f" (on the {self.lesion_slices} slice(s) with it); {self.lesion_free_with_evidence} of "
                     f"{self.lesion_free_slices} lesion-free slice(s) hold evidence")
        return text


def lesion_overlap(evidence_file: Path, lesion: np.ndarray) -> LesionOverlap:
    """Compare the evidence read back from a written NIfTI with the known ``lesion`` (same shape; a
    volume's slices along its last axis)."""
    import nibabel

    evidence = np.asarray(nibabel.load(evidence_file).dataobj) > 0
    if evidence.shape != lesion.shape:
        raise ValueError(f"{evidence_file}: evidence shape {evidence.shape} differs from the lesion's {lesion.shape}.")
    if lesion.ndim == 2:
        evidence, lesion = evidence[..., None], lesion[..., None]
    with_lesion = lesion.any((0, 1))
    inside = evidence[..., with_lesion]
    return LesionOverlap(
        on_lesion=float((inside & lesion[..., with_lesion]).sum() / max(int(inside.sum()), 1)),
        lesion_slices=int(with_lesion.sum()),
        lesion_free_slices=int((~with_lesion).sum()),
        lesion_free_with_evidence=int(evidence[..., ~with_lesion].any((0, 1)).sum()),
    )


def run_radiology_demo(
    output: str | Path = "medcam_demo_output/radiology",
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
    provenance: dict | None = None,
    **settings: object,
):
    """Write the demo studies to ``output/inputs`` and explain them into ``output/evidence``.

    Slices and images the classifier calls "no lesion" with no evidence at all are left empty
    (``skip_vacuous``; pass ``skip_vacuous=False`` to optimise them too). ``provenance``: as for
    :func:`~monai_medcam.pipeline.explain_inputs` (``run.json``; the command line gives it). Returns the
    :class:`~monai_medcam.pipeline.ExplainReport` and, per input, its :class:`LesionOverlap`.
    """
    from monai_medcam.demo.classifier import RADIOLOGY_SIZE, radiology_classifier
    from monai_medcam.demo.studies import write_demo_studies
    from monai_medcam.io import find_inputs
    from monai_medcam.pipeline import FORMATS, explain_inputs

    output = Path(output)
    lesions = write_demo_studies(output / "inputs")
    inputs, errors = find_inputs(output / "inputs")
    if errors:
        raise RuntimeError(f"demo inputs unreadable: {[str(e) for e in errors]}")
    report = explain_inputs(
        radiology_classifier(), inputs, output / "evidence", FORMATS, spatial_dims=2, channels=1,
        size=(RADIOLOGY_SIZE, RADIOLOGY_SIZE), gradcam_layer="layer4", batch_size=batch_size, device=device,
        progress=progress, class_names=CLASS_NAMES, provenance=provenance, **{"skip_vacuous": True, **settings},
    )
    overlaps = {}
    for item in inputs:
        nifti = output / "evidence" / f"{item.name}_evidence.nii.gz"
        if nifti.is_file():
            overlaps[item.path.name] = lesion_overlap(nifti, lesions[item.path.name])
    return report, overlaps
