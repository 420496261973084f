"""What a run was, written beside its outputs as ``run.json``: so that evidence shown to a clinician
or a regulator can be traced to the classifier, settings and software that made it, and repeated.

``medcam explain`` writes it when its inputs are counted (``"status": "running"``) and again when
the run ends (``"finished"``, ``"interrupted"`` or ``"failed"``, with counts); ``medcam wsi``, whose
outputs are all written at the end, writes ``<slide>_run.json`` with them ("finished", the tiles'
counts). Each time whole (written, then renamed); a record that cannot be written is a warning,
not a failed run. It records:

- ``command``: the arguments as given, and the working directory;
- ``classifier``: where it came from and each file read to build it, with its SHA-256 and size;
- ``settings``: the Med-CAM settings as given and as resolved for the classifier (the defaults of
  its dimensionality and kind filled in: what the explainer ran with);
- ``versions``: monai_medcam (with its git commit, and whether the checkout had changes, where it
  runs from one), Python, torch, MONAI and the I/O packages; ``device`` (the GPU's name where CUDA
  ran); ``started`` / ``ended`` (UTC).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import platform
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

import monai_medcam
from monai_medcam.writers import atomic_path

__all__ = ["RUN_RECORD", "command_context", "file_digest", "remove_run_record", "run_record", "write_run_record"]

RUN_RECORD = "run.json"
logger = logging.getLogger(__name__)
PACKAGES = ("torch", "torchvision", "monai", "numpy", "nibabel", "pydicom", "highdicom", "tifffile", "openslide-python")


def file_digest(path: str | Path) -> dict[str, object]:
    """``{"path", "sha256", "bytes"}`` of a file, read in 1 MiB blocks."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path.resolve()), "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _source() -> dict[str, object]:
    """monai_medcam's version, and its git commit and whether it had changes where the package is a
    checkout's (``__version__`` alone cannot tell two revisions apart)."""
    found: dict[str, object] = {"version": monai_medcam.__version__}
    folder = Path(monai_medcam.__file__).parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

        git("ls-files", "--error-unmatch", "__init__.py")  # tracked: not a wheel inside another project's checkout
        found["commit"] = git("rev-parse", "HEAD")
        found["changed"] = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an installed wheel)
        pass
    return found


def _versions() -> dict[str, object]:
    found: dict[str, object] = {"monai_medcam": _source(), "python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _device(name: str | torch.device) -> str:
    device = torch.device(name)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_record(explainer, spatial_dims: int, device: str | torch.device, given: Mapping[str, object], **context: object) -> dict[str, object]:
    """A new run's record (``status`` "running") for ``explainer`` (a :class:`~monai_medcam.MedCAM`)
    on inputs of ``spatial_dims``: the settings ``given`` and as resolved, its target layers, the
    device and versions, and ``context`` as given (``command``, ``classifier``: see the module)."""
    return {
        "status": "running",
        "started": _now(),
        "ended": None,
        **context,
        "settings": {"given": dict(given), "resolved": dataclasses.asdict(explainer.resolved_settings(spatial_dims))},
        "target_layers": [dataclasses.asdict(layer) for layer in explainer.classifier.layers],
        "device": _device(device),
        "versions": _versions(),
        "platform": f"{platform.system()} {platform.machine()}",
        "outcome": None,
    }


def command_context(argv: Sequence[str], classifier: str, classifier_files: Sequence[str | Path]) -> dict[str, object]:
    """``command`` and ``classifier`` for :func:`run_record`: the arguments as given (``medcam ...``),
    the working directory, the machine and process (a record left "running" by a killed run can be
    told from a live one), and each file the classifier was built from, with its digest."""
    return {
        "command": {"argv": ["medcam", *argv], "cwd": os.getcwd(), "host": socket.gethostname(), "pid": os.getpid()},
        "classifier": {"source": classifier, "files": [file_digest(f) for f in classifier_files]},
    }


def write_run_record(path: str | Path, record: Mapping[str, object], status: str | None = None, **outcome: object) -> Path | None:
    """Write ``record`` to ``path`` (``run.json`` in an output folder), whole (written, then renamed); with
    ``status`` ("finished", "interrupted", "failed") the run's end, its time and ``outcome`` too.
    ``None``, with a warning, where it cannot be written (a full disk): the run's outputs stand."""
    record = dict(record)
    if status is not None:
        record.update(status=status, ended=_now(), outcome=dict(outcome) or None)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    except OSError as err:
        logger.warning("%s: the run's record was not written (%s: %s).", path, type(err).__name__, err)
        return None
    return path


def remove_run_record(path: str | Path) -> None:
    """Remove an earlier run's record at ``path``: beside this run's outputs it would describe others."""
    Path(path).unlink(missing_ok=True)
