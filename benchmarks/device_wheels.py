"""Gather, in ``.whl/``, what the lent GPU machine lacks to run the benchmarks (``make device-wheels``).

The GPU machine's image has PyTorch, torchvision, scikit-image, matplotlib and tqdm but not MONAI,
nibabel or pydicom, and it cannot reach a package index: they travel as wheels (for its Python
3.12), at the versions installed here, with the pydicom-data files the known-evidence images read
(pydicom-data's whole wheel is 34 MB of the 64 MiB a call may carry). ``benchmarks/on_device.sh``
installs them there.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai_medcam.demo.known_evidence import DATA_STORE_FILES  # noqa: E402

PACKAGES = ("monai", "nibabel", "pydicom")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    wanted = [f"{name}=={metadata.version(name)}" for name in PACKAGES]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(args.dest), *wanted], check=True)
    import data_store  # installed by pydicom-data

    source = Path(data_store.__file__).parent
    target = args.dest / "data_store"
    (target / "data").mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "_version.py", "utils.py"):  # the package, without its 34 MB of data
        shutil.copy2(source / name, target / name)
    for name in DATA_STORE_FILES:
        shutil.copy2(source / "data" / name, target / "data" / name)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{', '.join(wanted)} and {len(DATA_STORE_FILES)} pydicom-data files in {args.dest} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
