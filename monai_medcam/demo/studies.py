"""Demo studies for the radiology path, made from real images shipped by installed packages.

``write_demo_studies(folder)`` writes, each with one synthetic lesion the demo classifier knows:

- ``mr_series/``: a 12-slice axial MR series (one DICOM file per slice), pixel data from nibabel's
  example MRI volume, headers from pydicom's ``MR_small.dcm``; the lesion spans three slices;
- ``chest_cr.dcm``: pydicom-data's computed radiograph ``RG1_UNCR`` (MONOCHROME1) with a lesion;
- ``brain.nii.gz``: nibabel's example MRI volume (the second time point) with a lesion, affine kept;
- ``fundus.png``: a crop of scikit-image's fundus photo with an exudate-like lesion.

The lesion masks are returned, so the demo can say how much of the evidence lies on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monai_medcam.demo.known_evidence import LESION_COLOUR, disc, paint_lesion

__all__ = ["write_demo_studies", "write_dicom_series"]

LESION_GRAY = float(np.mean(LESION_COLOUR))  # the training lesions' colour in grayscale


def _with_lesion(image: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """``image`` in [0, 1] with the ``lesion`` pixels painted as in the training data
    (:func:`~monai_medcam.demo.known_evidence.make_known_evidence` in grayscale)."""
    out = image.copy()
    out[lesion] = paint_lesion(out[lesion], LESION_GRAY)
    return out


def write_dicom_series(
    folder: Path, slices: np.ndarray, description: str, spacing: tuple[float, float, float] = (2.0, 2.0, 2.2)
) -> list[Path]:
    """Write ``slices`` ``(K, rows, columns)`` uint16 as an axial MR series, one file per slice, headers
    from pydicom's ``MR_small.dcm`` (new UIDs, demo patient). Instance Number ``k + 1`` for slice ``k``."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, pixels in enumerate(slices):
        ds = template.copy()
        for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept",
                        "SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = "Demo^MedCAM", "MEDCAM-DEMO"
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, 1, k + 1
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing, ds.SliceThickness = [spacing[0], spacing[1]], spacing[2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = round(spacing[2] * k, 6)  # a Decimal String holds at most 16 characters (2.2 * 11 = 24.200000000000003)
        ds.ImagePositionPatient = [-spacing[1] * pixels.shape[1] / 2, -spacing[0] * pixels.shape[0] / 2, z]
        ds.SliceLocation = z
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
        paths.append(folder / f"slice_{k + 1:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _mr_series(folder: Path) -> np.ndarray:
    import nibabel

    volume = nibabel.load(Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz").get_fdata()[..., 0]
    slices = [volume[:, :, z].T for z in range(6, 18)]  # (rows 96, columns 128) each
    low, high = np.percentile(np.stack(slices), [0.5, 99.5])
    lesions = np.zeros((len(slices),) + slices[0].shape, bool)
    for k in (5, 6, 7):
        lesions[k] = disc(slices[0].shape, (50, 74), 12 if k == 6 else 9)  # 6-8 px at the classifier's 64 px
    pixels = [_with_lesion(np.clip((image - low) / (high - low), 0, 1), lesions[k]) for k, image in enumerate(slices)]
    write_dicom_series(folder, np.round(np.stack(pixels) * 4000).astype(np.uint16), "Med-CAM demo MR")
    return lesions.transpose(2, 1, 0)  # (columns, rows, slices): MONAI's axis order


def _radiograph(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm", download=False))
    raw = ds.pixel_array.astype(np.float32)
    low, high = np.percentile(raw, [0.5, 99.5])
    display = np.clip((high - raw) / (high - low), 0, 1)  # MONOCHROME1: low values are bright
    lesion = disc(raw.shape, (0.45 * raw.shape[0], 0.62 * raw.shape[1]), 0.07 * min(raw.shape))
    display = _with_lesion(display, lesion)
    ds.PixelData = np.round(high - display * (high - low)).clip(0, 2 ** int(ds.BitsStored) - 1).astype(np.uint16).tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "Med-CAM demo radiograph"
    if "PixelSpacing" in ds and any(float(v) == 0 for v in ds.PixelSpacing):
        del ds.PixelSpacing  # the source's spacing is 0 (invalid); none is better than a wrong one
    ds.save_as(path, enforce_file_format=True)
    return lesion.T


def _nifti(path: Path) -> np.ndarray:
    import nibabel

    source = nibabel.load(Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz")
    volume = np.asarray(source.dataobj[..., 1], dtype=np.float32)  # the second time point (the MR series has the first)
    low, high = np.percentile(volume, [0.5, 99.5])
    lesion = np.zeros(volume.shape, bool)
    for z in (13, 14, 15):
        lesion[:, :, z] = disc(volume.shape[:2], (60, 30), 9 if z == 14 else 7)  # 5-7 px at the classifier's 64 px
    scaled = _with_lesion(np.clip((volume - low) / (high - low), 0, 1), lesion)
    nibabel.save(nibabel.Nifti1Image(scaled * (high - low) + low, source.affine), path)
    return lesion


def _fundus(path: Path) -> np.ndarray:
    from PIL import Image

    from monai_medcam.demo.known_evidence import make_known_evidence

    data = make_known_evidence(4, 192, "retina", "disc", seed=7)
    i = int(np.flatnonzero(data.labels == 1)[0])
    Image.fromarray(np.round(data.images[i].transpose(1, 2, 0) * 255).astype(np.uint8)).save(path)
    return data.lesion_masks[i, 0].T.astype(bool)


def write_demo_studies(folder: str | Path) -> dict[str, np.ndarray]:
    """Write the demo inputs to ``folder``; return each input's lesion mask in MONAI's axis order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "mr_series": _mr_series(folder / "mr_series"),
        "chest_cr.dcm": _radiograph(folder / "chest_cr.dcm"),
        "brain.nii.gz": _nifti(folder / "brain.nii.gz"),
        "fundus.png": _fundus(folder / "fundus.png"),
    }
