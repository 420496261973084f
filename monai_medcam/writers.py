"""Writing the evidence: NIfTI with the source's geometry, DICOM SEG referencing the source, PNG panels.

Every writer takes the evidence as MONAI reads images (a channel-first MetaTensor ``(1, *spatial)``
carrying the source image's metadata, see :mod:`monai_medcam.io`), writes to a temporary name in
the target folder and renames it into place, so a file either appears whole or not at all.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from monai_medcam.io import NOT_A_VOLUME, PHOTOMETRIC, SOURCE_FILES, SOURCE_FRAMES, UNEVEN_SLICES
from monai_medcam.orientation import ras_affine
from monai_medcam.visualize import evidence_labels, evidence_not_verified, needed_evidence, summary_flag, verification_by_slice

__all__ = ["write_nifti", "write_dicom_seg", "write_png", "write_outputs", "output_formats", "OutputError", "FORMATS", "dicom_frames", "atomic_path", "SEGMENT_LABEL"]

SEGMENT_LABEL = "Med-CAM evidence"
NOT_VERIFIED_LABEL = "Med-CAM evidence, NOT verified"
GREEN_LAB, RED_LAB = (87.7, -86.2, 83.2), (53.2, 80.1, 67.2)  # CIE L*a*b* of sRGB green and red
FORMATS = ("seg", "nifti", "png")
FORMAT_NAMES = {"seg": "DICOM SEG", "nifti": "NIfTI", "png": "PNG"}
EVIDENCE_SUFFIXES = {"seg": "_evidence_seg.dcm", "nifti": "_evidence.nii.gz", "png": "_evidence.png"}  # after the input's name
SEG_NEEDS_DICOM = "a DICOM SEG needs a DICOM source and this input is not DICOM; nothing written (add --format nifti or png)."
SEG_NEEDS_POSITIONS = ("a DICOM SEG on a multi-frame source needs its frames' positions in space (highdicom), and this source "
                       "has {}; nothing written (add --format nifti or png).")
logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every attribute it copies at INFO
logger = logging.getLogger(__name__)
# recorded in a SEG's Pixel Measures for a source with Pixel Spacing but no Slice Thickness (a
# secondary capture, a planar NM image): the standard and highdicom's reader need a value there
NOMINAL_SLICE_THICKNESS = 1.0
# the source's patient and study attributes highdicom copies into a SEG (type 2 there: empty is valid)
SEG_COPIES = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime")


def seg_problem(meta: Mapping) -> str | None:
    """Why an image with this metadata cannot have a DICOM SEG (``None`` if it can): it is not DICOM,
    or it is a multi-frame DICOM whose frames have no positions (a cine: highdicom writes no SEG on it)."""
    if not meta.get(SOURCE_FILES):
        return SEG_NEEDS_DICOM
    if meta.get(NOT_A_VOLUME):
        return SEG_NEEDS_POSITIONS.format(meta[NOT_A_VOLUME])
    return None


def output_formats(formats: str | Sequence[str]) -> list[str]:
    """``formats`` as a list of known formats: ``"seg,nifti"`` or ``"png"`` (one string) or a sequence."""
    names = [f.strip() for f in formats.split(",") if f.strip()] if isinstance(formats, str) else list(formats)
    unknown = sorted(set(names) - set(FORMATS))
    if unknown or not names:
        raise ValueError(f"unknown output format(s) {unknown or formats!r}; choose from {', '.join(FORMATS)}.")
    return names


class OutputError(ValueError):
    """Some of an input's outputs could not be written; ``written`` holds the files that were."""

    def __init__(self, written: list[Path], problem: str) -> None:
        self.written = written
        super().__init__(problem)


TEMPORARY = re.compile(r"\.tmp-(\d+)-(.+)")  # atomic_path's temporary name: .tmp-<pid>-<target's name>
_renamed_together: ContextVar[list[tuple[Path, Path]] | None] = ContextVar("_renamed_together", default=None)


class atomic_path:
    """``with atomic_path(target) as tmp:`` write ``tmp`` (``.tmp-<pid>-<name>`` beside it, the same
    suffix: writers choose the format by it); on success it is flushed to disk and renamed to
    ``target`` (within :func:`renamed_together`, at that block's end), else removed."""

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)
        self.tmp = self.target.with_name(f".tmp-{os.getpid()}-{self.target.name}")

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.tmp.unlink(missing_ok=True)
            return
        together = _renamed_together.get()
        if together is None:
            _replace(self.tmp, self.target)
        else:
            together.append((self.tmp, self.target))


def _replace(tmp: Path, target: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``target``; where that fails, ``tmp`` is removed."""
    try:
        with tmp.open("rb") as handle:  # a crash just after the rename must not leave an empty file under the name
            os.fsync(handle.fileno())
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def renamed_together() -> Iterator[None]:
    """Within the block, files written with :class:`atomic_path` keep their temporary names until
    the block ends, then are renamed together; if the block fails (an interrupt too), all are
    removed. So one input's evidence files are all from one run: an interrupt between two formats
    leaves the earlier run's set whole, not a mix of both."""
    pending: list[tuple[Path, Path]] = []
    token = _renamed_together.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _renamed_together.reset(token)
    for k, (tmp, target) in enumerate(pending):
        try:
            _replace(tmp, target)
        except BaseException:
            for left, _ in pending[k + 1 :]:
                left.unlink(missing_ok=True)
            raise


class OutputsLocked(RuntimeError):
    """Another run holds the lock on these outputs (:func:`only_writer`); ``lock``: its file."""

    def __init__(self, lock: Path) -> None:
        self.lock = lock
        super().__init__(f"another run holds {lock}")


@contextmanager
def only_writer(lock: Path) -> Iterator[bool]:
    """Hold ``lock`` (an exclusive ``flock``; the file is made if need be) for the block, giving
    ``True``: a second run on the same outputs gets :class:`OutputsLocked` rather than interleaving
    its writes with this one's. The lock file is removed at the end, while held; a
    run that locked a file so removed (it opened it just before) tries again on the new one.
    Without ``fcntl`` (Windows), or on a file system without locks (logged), no lock is taken: ``False``,
    and the run cannot know whether another writes beside it."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    while True:
        handle = lock.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.close()
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputsLocked(lock) from err
            logger.warning("cannot lock %s (%s); a second run on these outputs would not be stopped.", lock, err)
            yield False
            return
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the file of a run that finished between this run's open and its lock
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)  # while held: a run that opened it meanwhile finds it gone and tries again
        handle.close()


def remove_temporaries(folder: Path, names: set[str]) -> list[Path]:
    """Remove ``folder``'s :class:`atomic_path` temporaries of the files ``names`` (a run killed while
    writing them left them; the caller holds the folder, so none is being written), and list them."""
    removed = []
    for left in folder.glob(".tmp-*"):
        match = TEMPORARY.fullmatch(left.name)
        if match and match.group(2) in names and left.is_file():
            left.unlink(missing_ok=True)
            removed.append(left)
    return removed


def write_nifti(mask: MetaTensor, path: str | Path, dtype: type = np.uint8, *, verified: Sequence[bool | None] | None = None) -> Path:
    """Write ``mask`` ``(1, *spatial)`` as NIfTI with exactly its metadata's affine (no resampling).

    ``verified`` (one flag per slice along the last axis, or one for the whole mask, as
    :func:`~monai_medcam.visualize.verification_by_slice` gives them): evidence that was not
    verified (``False``) is written as label 2, the rest as 1 (the DICOM SEG's segments 1 and 2,
    the MONAI Label app's labels; :func:`~monai_medcam.visualize.evidence_labels`).

    The affine is the source image's as MONAI read it (RAS, as ``SaveImage(..., resample=False)``
    would write it); written with nibabel directly, because MONAI's writer fails on 2D images when
    it is told not to resample.
    """
    import nibabel

    path = Path(path)
    if not isinstance(mask, MetaTensor) or "affine" not in mask.meta:
        raise ValueError(f"{path}: the mask needs the source image's affine (a MetaTensor from monai_medcam.io).")
    gaps = mask.meta.get(UNEVEN_SLICES)
    if gaps:
        raise ValueError(f"the source's slices are unevenly spaced (gaps {gaps}), which a NIfTI's "
                         "regular grid cannot hold; the DICOM SEG keeps each slice's own position.")
    data = evidence_labels(mask[0].detach().cpu().numpy().astype(dtype), verified)
    affine = np.asarray(mask.affine, dtype=np.float64)
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    if (lengths < 1e-6).any() or abs(np.linalg.det(affine[:3, :3] / lengths)) < 1e-6:
        raise ValueError(f"{path}: the source's affine is singular (its axes {affine[:3, :3].tolist()} span no volume).")
    columns = affine[:3, :3] / lengths
    image = nibabel.Nifti1Image(data, affine)
    sheared = not np.allclose(columns.T @ columns, np.eye(3), atol=1e-3)  # a gantry tilt: the slices stacked obliquely
    if sheared:
        logger.warning("%s: the source's slices are stacked obliquely (a gantry tilt): the NIfTI holds its geometry in the "
                       "sform alone, exact for nibabel, MONAI and FSL; ITK-based tools (3D Slicer, ITK-SNAP, SimpleITK) "
                       "refuse such a file: use the DICOM SEG there.", path.name)
    image.set_qform(affine, code=0 if sheared else 1)  # a qform is a rotation: it cannot hold a shear, so no qform
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nibabel.save(image, tmp)
    return path


def dicom_frames(mask: torch.Tensor) -> np.ndarray:
    """``(1, X, Y[, Z])`` in MONAI's DICOM axis order -> DICOM frames ``(Z, rows, columns)``."""
    array = mask[0].detach().cpu().numpy()
    if array.ndim == 2:
        return array.T[None]
    return array.transpose(2, 1, 0)


def write_dicom_seg(
    mask: MetaTensor,
    path: str | Path,
    soft_mask: torch.Tensor | None = None,
    fractional: bool = False,
    label: int | None = None,
    series_number: int = 99,
    parameters: Mapping[str, str] | None = None,
    class_names: Mapping[int, str] | None = None,
    verified: Sequence[bool | None] | None = None,
) -> Path:
    """Write the evidence as a DICOM Segmentation that references the source instances.

    Segment 1, "Med-CAM evidence" (green), holds the verified evidence, property type DCM 130401
    "Visual explanation", algorithm type AUTOMATIC with Med-CAM's name and version. Evidence that
    was not verified (``verified``) goes to segment 2, "Med-CAM evidence, NOT verified" (red), which
    a viewer names where it draws it, and the series description then starts with "NOT verified";
    segment 1 is then empty on those slices (on all, where nothing was verified). Each segment has
    one frame per source frame: frame ``k`` is the mask on the source instance
    of slice ``k`` (``mask.meta[SOURCE_FILES]``, in slice order), for a 3D explanation of a series
    or slice-by-slice 2D explanations alike; on a multi-frame source (one file), on the frame of
    slice ``k`` (``mask.meta[SOURCE_FRAMES]``). New series and instance UIDs; patient and study
    identity come from the source (highdicom copies exactly what the standard requires).

    Args:
        mask: binary evidence ``(1, X, Y[, Z])`` carrying the source's metadata.
        path: the ``.dcm`` file to write.
        soft_mask: the soft mask ``(1, X, Y[, Z])`` in [0, 1], needed when ``fractional``.
        fractional: write a FRACTIONAL (probability) segmentation of ``soft_mask`` instead of BINARY.
        label: the explained class, recorded in the segment's description and algorithm parameters.
        series_number: the new series' number.
        parameters: extra algorithm parameters to record (name -> value).
        class_names: ``{index: name}`` (:func:`~monai_medcam.visualize.class_names_map`): the
            explained class's name joins its index in the descriptions ("evidence for lesion (class 1)").
        verified: whether each slice's evidence was verified (one per slice, or one for the whole
            input), ``None`` in it where the decision needed no evidence (a vacuous decision left with
            an empty mask: nothing to verify, counted neither way); ``None``: not recorded (one
            segment, and the SEG claims nothing either way).
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from monai_medcam import __version__

    path = Path(path)
    files = mask.meta.get(SOURCE_FILES) if isinstance(mask, MetaTensor) else None
    if not files:
        raise ValueError(f"{path}: a DICOM SEG needs the source DICOM files (load the image with monai_medcam.io).")
    if fractional and soft_mask is None:
        raise ValueError(f"{path}: a FRACTIONAL SEG needs the soft mask.")
    values = soft_mask if fractional else mask
    depth = values.shape[-1] if values.ndim == 4 else 1
    if verified is not None and len(verified) not in (1, depth):
        raise ValueError(f"{path}: {len(verified)} verification flags for {depth} slices.")
    flags = [None] if verified is None else list(verified)
    failed = np.broadcast_to(np.array([v is False for v in flags]), (depth,))
    needed = sum(v is not None for v in flags)  # the decisions that needed evidence (of one per slice, or the input's one)
    # segment 1 always the verified evidence (empty where none was), segment 2 the rest where there is any
    parts = {SEGMENT_LABEL: ~failed, **({NOT_VERIFIED_LABEL: failed} if failed.any() else {})}
    frames = np.stack([dicom_frames(values * torch.as_tensor(slices.copy()).to(values.device)) for slices in parts.values()], -1)
    if mask.meta.get(SOURCE_FRAMES) is not None:
        frames = _in_source_frames(frames, mask.meta, path)
    elif frames.shape[0] != len(files):
        raise ValueError(f"{path}: the mask has {frames.shape[0]} slices but the source has {len(files)} instances.")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for source, f in zip(sources, files):  # what a SEG must reference (highdicom would fail on them obscurely)
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID") if not source.get(k)]
        if missing:
            raise ValueError(f"the source {Path(f).name} has no {', '.join(missing)}, which a DICOM SEG must reference.")
    for source in sources:  # in memory only: the patient and study attributes a SEG copies, empty where missing (type 2)
        absent = [k for k in SEG_COPIES if k not in source]
        for keyword in absent:
            setattr(source, keyword, "")
        if absent:
            logger.info("%s has no %s; its SEG records them empty", source.get("SOPInstanceUID"), ", ".join(absent))
        for keyword, mark in (("StudyTime", ":"), ("StudyDate", "."), ("PatientBirthDate", ".")):  # ACR-NEMA's 11:20:00, 1993.05.26
            value = str(source.get(keyword) or "")
            if mark in value and value.replace(mark, "").replace(".", "").isdigit():
                setattr(source, keyword, value.replace(mark, ""))
    for source in sources:  # in memory only: the SEG's Pixel Measures need a Slice Thickness beside the Pixel Spacing
        if "PixelSpacing" in source and not source.get("SliceThickness"):
            source.SliceThickness = source.get("SpacingBetweenSlices") or NOMINAL_SLICE_THICKNESS
            logger.info("%s has no Slice Thickness; its SEG records %s mm (nominal)", source.get("SOPInstanceUID"), source.SliceThickness)
    _geometry_where_highdicom_looks(sources[0])
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if frames.shape[1:3] != (rows, columns):
        raise ValueError(f"{path}: mask frames {frames.shape[1:3]} differ from the source's {rows}x{columns} pixels.")
    params = {"class": str(label) if label is not None else "predicted"}
    if verified is not None and len(flags) == 1:  # one decision for the whole input
        params["verified"] = "no evidence needed" if flags[0] is None else "yes" if flags[0] else "no"
    elif verified is not None:  # one per slice
        params["verified"] = f"{needed - int(failed.sum())} of {needed} slices" + (
            f" ({depth - needed} needed no evidence)" if needed < depth else "")
    params.update(parameters or {})
    algorithm = hd.AlgorithmIdentificationSequence(
        name="Med-CAM", version=__version__, family=codes.cid7162.ArtificialIntelligence, source="monai_medcam",
        parameters=params,
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=Code("309825002", "SCT", "Spatial and Relational Concept"),
            segmented_property_type=Code("130401", "DCM", "Visual explanation"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor(*(RED_LAB if name == NOT_VERIFIED_LABEL else GREEN_LAB)),  # as the PNG panels
        )
        for number, name in enumerate(parts, start=1)
    ]
    if fractional:
        pixels = np.clip(frames.astype(np.float32), 0.0, 1.0)
        kind = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels = (frames > 0.5).astype(np.uint8)
        kind = hd.seg.SegmentationTypeValues.BINARY
    checks = 1 if len(flags) == 1 else needed  # one decision for the input, or the slices that needed evidence
    what = _seg_description(label, (class_names or {}).get(label, "") if label is not None else "",
                            int(failed.any()) if len(flags) == 1 else int(failed.sum()), checks)
    try:
        seg = _segmentation(sources, pixels if len(parts) > 1 else pixels[..., 0], kind, segments, series_number, what)
    except Exception as err:  # highdicom's errors say what it missed, not for which source
        sop = getattr(sources[0].get("SOPClassUID"), "name", "unknown SOP class")
        raise ValueError(f"highdicom cannot build a SEG on this source ({sop}): {type(err).__name__}: {err}") from err
    if "ImageOrientationPatient" not in sources[0]:
        # projection images (CR, DX, US): the General Image module then needs Patient Orientation (type 2C)
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path


def _seg_description(label: int | None, name: str, failed: int, checks: int) -> str:
    """The SEG's series and content description (LO, 64 characters), e.g. "NOT verified on 2/12: Med-CAM
    evidence for lesion (class 1)": the warning first, where a series list shows it whole (``failed``
    of ``checks``: one per slice, or one for the input's one decision), then the class, its name
    shortened to fit."""
    prefix = "" if not failed else "NOT verified: " if checks == 1 else f"NOT verified on {failed}/{checks}: "
    if label is None:
        return f"{prefix}Med-CAM evidence"
    tail = f" (class {label})"
    name = _plain_text(name)[: max(0, 64 - len(prefix) - len("Med-CAM evidence for ") - len(tail))]
    return f"{prefix}Med-CAM evidence for {name}{tail}" if name else f"{prefix}Med-CAM evidence for class {label}"


def _in_source_frames(frames: np.ndarray, meta: Mapping, path: Path) -> np.ndarray:
    """A multi-frame source's mask ``(N, rows, columns[, segments])`` in slice order -> in the file's frame order."""
    if meta.get(NOT_A_VOLUME):  # highdicom: "Only a single frame is supported when the source image has no Frame of Reference UID"
        raise ValueError(f"{path}: {SEG_NEEDS_POSITIONS.format(meta[NOT_A_VOLUME])}")
    order = np.asarray(meta[SOURCE_FRAMES]) - 1
    if frames.shape[0] != len(order):
        raise ValueError(f"{path}: the mask has {frames.shape[0]} slices but the source has {len(order)} frames.")
    placed = np.empty_like(frames)
    placed[order] = frames
    return placed


def _geometry_where_highdicom_looks(source) -> None:
    """In memory, for highdicom: a multi-frame source's Plane Position kept in its shared functional
    groups (legal for one frame) copied into each frame's; a Plane Orientation or Pixel Measures
    kept in each frame's (as some scanners write them), the same for every frame (the reader
    refuses them otherwise), moved into the shared groups."""
    import copy

    groups = source.get("PerFrameFunctionalGroupsSequence") or []
    shared = (source.get("SharedFunctionalGroupsSequence") or [None])[0]
    if not groups or shared is None:
        return
    if "PlanePositionSequence" in shared:
        for group in groups:
            if "PlanePositionSequence" not in group:
                group.PlanePositionSequence = copy.deepcopy(shared.PlanePositionSequence)
    for keyword in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
        if keyword not in shared and all(keyword in group for group in groups):
            setattr(shared, keyword, copy.deepcopy(getattr(groups[0], keyword)))
            for group in groups:
                delattr(group, keyword)


def _segmentation(sources: list, pixels: np.ndarray, kind, segments: list, series_number: int, what: str):
    """highdicom's Segmentation of ``pixels`` ``(frames, rows, columns[, segments])`` on ``sources``."""
    import highdicom as hd

    from monai_medcam import __version__

    # the source's character set, where highdicom takes it; else UTF-8, which holds any text (a
    # Japanese or Korean set has an empty first value, the default repertoire, which highdicom refuses)
    charset = sources[0].get("SpecificCharacterSet")
    values = [charset] if isinstance(charset, str) else list(charset or [])
    known = {v.value for v in hd.enum.SpecificCharacterSetValues}
    return hd.seg.Segmentation(
        specific_character_set=charset if all(v in known for v in values) else "ISO_IR 192",
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="monai_medcam",
        manufacturer_model_name="Med-CAM",
        software_versions=__version__,
        device_serial_number="none",
        content_label="MEDCAM",
        content_description=what[:64],
        series_description=what[:64],
        omit_empty_frames=False,
    )


def _plain_text(text: str) -> str:
    """``text`` as printable ASCII for a DICOM LO value: accents dropped, a backslash (the value
    separator) and control characters replaced."""
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    return "".join(c if c.isprintable() and c != "\\" else "-" for c in ascii_text).strip()


def _display_slices(image: torch.Tensor, mask: torch.Tensor, count: int, candidates: Sequence[int] | None) -> tuple[list[int], int]:
    """``count`` slices (last axis) that hold evidence, in slice order: the first of ``candidates``
    (most wanted first, :func:`panel_slices`) that do, or without ``candidates`` those with the most
    evidence. With no evidence anywhere, the first candidate (without candidates, the middle
    slice). Also how many of the candidates hold evidence."""
    area = mask[0].flatten(0, -2).float().sum(0)
    if candidates is None:
        if float(area.max()) <= 0:
            return [image.shape[-1] // 2], 0
        candidates = torch.argsort(area, descending=True, stable=True).tolist()
    holding = [int(k) for k in candidates if area[k] > 0]
    if not holding:
        return [int(candidates[0]) if len(candidates) else image.shape[-1] // 2], 0
    return sorted(holding[:count]), len(holding)


def evidence_class(rows: Sequence[Mapping[str, object]]) -> int | None:
    """The class an input's evidence is for, from its summary rows: the one class of the decisions
    that needed evidence (of all decisions where none did), ``None`` where they differ (a volume's
    slices called both ways, each slice's evidence for its own call)."""
    labels = {int(r["label"]) for r in rows if "label" in r and needed_evidence(r)} or {int(r["label"]) for r in rows if "label" in r}
    return labels.pop() if len(labels) == 1 else None


def panel_slices(rows: Sequence[Mapping[str, object]]) -> list[int] | None:
    """The slices a volume's panels show first, most wanted first, from its summary rows (one per
    slice): those whose evidence was not verified, then the others whose decision needed evidence,
    surest call first (a stalled mask tends to come with an unsure call, and keeps much of its
    slice). ``None`` where every decision was vacuous (and for one row: a whole input's decision)."""
    if len(rows) < 2:
        return None
    # a vacuous decision's mask (optimised, without skip_vacuous) only where it failed its check
    needed = [k for k, row in enumerate(rows) if not summary_flag(row.get("vacuous")) or evidence_not_verified(row)]
    needed.sort(key=lambda k: (not evidence_not_verified(rows[k]), -float(rows[k].get("prob_input") or 0.0)))
    return needed or None


def write_png(
    image: torch.Tensor,
    mask: torch.Tensor,
    path: str | Path,
    heatmaps: Mapping[str, torch.Tensor] | None = None,
    title: str = "",
    max_slices: int = 3,
    candidates: Sequence[int] | None = None,
    rows: Sequence[Mapping[str, object]] = (),
    class_names: Mapping[int, str] | None = None,
    affine: torch.Tensor | np.ndarray | None = None,
) -> Path:
    """Panels for a person to look at: image | evidence (contour and tint) | each heatmap.

    Args:
        image: ``(C, X, Y[, Z])`` as loaded (axis 0 along the columns, shown as such).
        mask: binary evidence ``(1, X, Y[, Z])``.
        path: the PNG to write.
        heatmaps: title -> ``(1, X, Y[, Z])`` maps in [0, 1] (e.g. Grad-CAM) shown beside the evidence.
        title: text above the first panel.
        max_slices: for a volume, at most this many slices with evidence are shown, one per row
            (a heading says how many of how many), titled by their index as in ``summary.csv``...
        candidates: ...the first of these that hold evidence (most wanted first, :func:`panel_slices`;
            default: the slices with the most evidence).
        rows: the summary rows (:meth:`MedCAMResult.summary`), one per slice of a volume explained
            slice by slice, else one: each panel row then says the decision and whether its evidence
            was verified (:func:`~monai_medcam.visualize.evidence_caption`; red where it was not).
        class_names: ``{index: name}``: the decision shown by name ("lesion (p 0.97)").
        affine: a volume's (RAS): its slices are shown as radiology shows their plane, the
            patient's directions marked (:func:`~monai_medcam.visualize.display_orientation`);
            ``None``: as stored.
    """
    from monai_medcam.visualize import display_orientation, evidence_caption, save_panels

    image = torch.as_tensor(image).detach().cpu().float()
    mask = torch.as_tensor(mask).detach().cpu().float()
    maps = {k: torch.as_tensor(v).detach().cpu().float() for k, v in (heatmaps or {}).items()}
    shown = display_orientation(affine) if affine is not None and image.ndim == 4 else None  # a volume's, even of one slice
    if image.ndim == 3:
        image, mask, maps = image[..., None], mask[..., None], {k: v[..., None] for k, v in maps.items()}
    if shown is not None:  # a volume's slices as radiology shows their plane (slice numbers unchanged)
        swap, flip_across, flip_down, edges = shown

        def displayed(volume: torch.Tensor) -> torch.Tensor:
            volume = volume.transpose(1, 2) if swap else volume
            return volume.flip([d for d, flip in ((1, flip_across), (2, flip_down)) if flip]) if flip_across or flip_down else volume

        image, mask, maps = displayed(image), displayed(mask), {k: displayed(v) for k, v in maps.items()}
    slices, holding = _display_slices(image, mask, max_slices, candidates)

    def panel_rows(volume: torch.Tensor) -> torch.Tensor:  # (C, X, Y, Z) -> (S, C, Y, X): rows are the image's rows
        return torch.stack([volume[..., k].transpose(-1, -2) for k in slices])

    columns = {SEGMENT_LABEL: panel_rows(mask), **{k: panel_rows(v) for k, v in maps.items()}}
    depth = image.shape[-1]
    if len(title) > 32:  # the panel is 2.4 inches wide: a long file name keeps its start and end
        title = f"{title[:14]}...{title[-15:]}"
    titles = [f"{title} slice {k} (0-{depth - 1})".strip() if depth > 1 else title or "image" for k in slices]  # as summary.csv
    # one row per slice (a 2D classifier over a volume), or one for the whole input
    whole = "volume" if len(rows) == 1 and depth > 1 else ""  # one decision for the whole volume, on each row shown
    captions = [evidence_caption(rows[k if len(rows) > 1 else 0], class_names, whole) if len(rows) in (1, depth) else None
                for k in slices]
    titles = [f"{t}\n{c[0]}" if c else t for t, c in zip(titles, captions)]
    notes = {SEGMENT_LABEL: [(c[1], c[2]) if c else None for c in captions]}
    heading = ""
    if holding > len(slices):
        heading = f"{len(slices)} of {holding} slices with evidence shown" + (
            ": not verified first, then the surest calls" if candidates is not None else ": the most evidence")
    return save_panels(path, panel_rows(image), columns, row_titles=titles, heatmaps=tuple(maps), notes=notes, heading=heading,
                       edges=shown[3] if shown is not None else None)


def write_outputs(
    image: MetaTensor,
    mask: MetaTensor,
    folder: str | Path,
    name: str,
    formats: Sequence[str],
    soft_mask: torch.Tensor | None = None,
    label: int | None = None,
    heatmaps: Mapping[str, torch.Tensor] | None = None,
    title: str = "",
    fractional: bool = False,
    display_slices: Sequence[int] | None = None,
    rows: Sequence[Mapping[str, object]] = (),
    class_names: Mapping[int, str] | None = None,
) -> list[Path]:
    """Write ``mask`` for ``image`` in each of ``formats`` (``seg``, ``nifti``, ``png``) as ``folder/name.*``.

    Each format is written on its own: one that fails does not keep the others from being written.
    They are renamed into place together once all are written (:func:`renamed_together`): an
    interrupt while they are written leaves none of this call's files, and an earlier run's set whole.
    ``rows`` (the summary rows: one per slice of a volume explained slice by slice, else one) caption
    the PNG's panels with the decision and whether the evidence was verified (:func:`write_png`),
    and put evidence that was not verified in a segment of its own in the SEG (:func:`write_dicom_seg`;
    a vacuous decision left with an empty mask is not counted as not verified:
    :func:`~monai_medcam.visualize.evidence_not_verified`);
    ``class_names`` (``{index: name}``) name the class there and in the SEG's descriptions.

    A ``seg`` is left out (logged) for a source that is not DICOM, or a multi-frame DICOM whose
    frames have no positions (a cine: highdicom writes no SEG on it).

    Raises:
        OutputError: a format could not be written (its files, if any, are not left behind), or
            only ``seg`` was asked for a source that cannot have one; ``written`` lists what was.
    """
    folder = Path(folder)
    formats = output_formats(formats)
    no_seg = seg_problem(mask.meta)
    if set(formats) == {"seg"} and no_seg:
        raise OutputError([], no_seg)
    written: list[Path] = []
    problems: list[str] = []
    depth = mask.shape[-1] if mask.ndim == 4 else 1
    verified = verification_by_slice(rows, depth)  # None where not recorded: then not claimed
    if rows and len(rows) not in (1, depth):
        logger.warning("%s: %d summary rows for %d slices; the outputs record no verification.", name, len(rows), depth)
    with renamed_together():  # all of the input's files from this run, or (interrupted) none of them
        for fmt in formats:
            try:
                if fmt == "nifti":
                    written.append(write_nifti(mask, folder / (name + EVIDENCE_SUFFIXES["nifti"]), verified=verified))
                elif fmt == "seg":
                    if no_seg:  # not DICOM, or a cine: the other formats are written
                        if mask.meta.get(NOT_A_VOLUME):
                            logger.warning("%s: no DICOM SEG: highdicom writes none on %s; the other formats are written.",
                                           name, mask.meta[NOT_A_VOLUME])
                        continue
                    written.append(write_dicom_seg(mask, folder / (name + EVIDENCE_SUFFIXES["seg"]), soft_mask, fractional, label,
                                                   class_names=class_names, verified=verified))
                elif fmt == "png":
                    shown = image.max() - image if image.meta.get(PHOTOMETRIC) == "MONOCHROME1" else image  # low values bright
                    placed = isinstance(image, MetaTensor) and image.ndim == 4 and not image.meta.get(NOT_A_VOLUME)  # not a cine's frames
                    written.append(write_png(shown, mask, folder / (name + EVIDENCE_SUFFIXES["png"]), heatmaps, title,
                                             candidates=display_slices, rows=rows, class_names=class_names,
                                             affine=ras_affine(image) if placed else None))
            except Exception as err:  # noqa: BLE001 - reported with the format, the other formats go on
                problems.append(f"{FORMAT_NAMES[fmt]} not written ({type(err).__name__}: {err})")
    if problems:
        also = f"; written: {', '.join(p.name for p in written)}" if written else "; nothing written"
        raise OutputError(written, "; ".join(problems) + also)
    return written
