"""Write the bundle's embedded sample data (``sample_data/``) from images that installed packages ship.

    python bundles/medcam_explain/scripts/make_sample_data.py

Three inputs with a synthetic lesion each, made by :func:`monai_medcam.demo.studies.write_demo_studies`:
a 12-slice DICOM MR series (nibabel's test volume with pydicom's MR_small headers), a NIfTI brain
volume (nibabel's test data) and a grayscale-able fundus PNG (scikit-image's retina). The demo's
chest radiograph is left out to keep the bundle small (7 MB).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from monai_medcam.demo.studies import write_demo_studies

SAMPLES = ("mr_series", "brain.nii.gz", "fundus.png")


def main(bundle_root: Path = Path(__file__).resolve().parents[1]) -> None:
    target = bundle_root / "sample_data"
    with tempfile.TemporaryDirectory(dir=bundle_root) as tmp:
        staging = Path(tmp) / "sample_data"
        write_demo_studies(staging)
        for name in set(p.name for p in staging.iterdir()) - set(SAMPLES):
            path = staging / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


if __name__ == "__main__":
    main()
