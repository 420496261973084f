"""Finding and reading the images to explain: DICOM files and series, NIfTI, PNG/JPEG/TIFF.

Reading goes through MONAI's ``LoadImage`` with the reader chosen explicitly (``PydicomReader``
for DICOM, so ITK is not needed; ``NibabelReader``; ``PILReader``). Every image comes back as a
channel-first MetaTensor ``(C, *spatial)`` with its affine; a DICOM image also carries its source
files in the order of its last spatial axis (``meta[SOURCE_FILES]``), which the DICOM SEG writer
needs to reference the right instance for each frame.

Array axes follow MONAI's convention for DICOM (``swap_ij``): spatial axis 0 runs along the
columns of the DICOM image, axis 1 along the rows, axis 2 through the slices.

A multi-frame DICOM file (enhanced CT/MR, a legacy-converted series, an ultrasound cine) is read
by :func:`_read_frames` (highdicom decodes its frames) into the same layout: frames with positions
in space become a volume's slices, ordered along their normal, and ``meta[SOURCE_FRAMES]`` says
which frame each slice is; frames without (a cine, a multi-frame capture) stay in file order and
``meta[NOT_A_VOLUME]`` says so (a 2D classifier explains them one by one).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.data import MetaTensor, PydicomReader

__all__ = [
    "ImageInput",
    "InputError",
    "NotAnImage",
    "SOURCE_FILES",
    "SOURCE_FRAMES",
    "NOT_A_VOLUME",
    "INPUT_KIND",
    "PHOTOMETRIC",
    "INPUT_NAME",
    "INPUT_LABEL",
    "UNEVEN_SLICES",
    "find_input",
    "find_inputs",
    "output_names",
    "input_datalist",
    "load_image",
    "is_dicom_file",
]

logger = logging.getLogger(__name__)
# MONAI warns on every DICOM read that the optional GPU decoder is missing; the CPU decoder is fine
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

SOURCE_FILES = "medcam_source_files"
SOURCE_FRAMES = "medcam_source_frames"  # a multi-frame DICOM's frame number (1-based) of each slice
NOT_A_VOLUME = "medcam_not_a_volume"  # why a stack of frames has no geometry ("30 frames without positions ...")
INPUT_KIND = "medcam_input_kind"
PHOTOMETRIC = "medcam_photometric"
INPUT_NAME = "medcam_input_name"
INPUT_LABEL = "medcam_input_label"  # the input's path, and its series where several share a folder
UNEVEN_SLICES = "medcam_uneven_slice_gaps"  # a DICOM series' range of slice gaps, when they differ

# DICOM objects with pixel data that are annotations, not images: Segmentation, Surface/Label Map Segmentation
ANNOTATION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.5", "1.2.840.10008.5.1.4.1.1.66.7")
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"  # a dose grid: pixel data, but a computed distribution, not an image
NIFTI_SUFFIXES = (".nii", ".nii.gz")
OUTPUT_SUFFIXES = ("_evidence.nii.gz", "_evidence.png", "_evidence_seg.dcm")  # what monai_medcam.writers writes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class InputError(ValueError):
    """An input that cannot be explained; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class NotAnImage(InputError):
    """A file with no image in it (a text file, a DICOM structured report or plan): searching a
    folder, it is passed over rather than failed; given by name, it is an error like any other."""


@dataclass(frozen=True)
class ImageInput:
    """One image to explain.

    Attributes:
        path: the file, or for a DICOM series its folder.
        kind: ``"dicom_series"``, ``"dicom"``, ``"dicom_frames"`` (a multi-frame file), ``"nifti"`` or ``"image"``.
        files: for a DICOM series, its files in slice order: by Instance Number, or by position
            along the slices' normal where the numbers run against it (interleaved acquisitions).
        uneven_gaps: for a DICOM series whose slice gaps differ, their range (``"1.25-202.5 mm"``).
        series: for a DICOM series that shares its folder with other series, which one it is
            (``"4"``, its Series Number; ``""`` when the folder holds only this series).
        series_uid: a DICOM slice's or series' Series Instance UID, where it is placed in space.
    """

    path: Path
    kind: str
    files: tuple[Path, ...] = ()
    uneven_gaps: str | None = None
    series: str = ""
    series_uid: str = ""

    @property
    def name(self) -> str:
        """A file-system-safe stem for the outputs: ``series_folder`` (``series_folder_s4`` for its
        series 4 beside others), ``image`` for ``image.png``."""
        name = self.path.name or self.path.resolve().name  # "." is its folder's name
        for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES + (".dcm", ".dicom"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)] or name
                break
        return f"{name}_s{self.series}" if self.series else name

    @property
    def label(self) -> str:
        """How the input is named in the summary and in messages: its path (and series, if it shares its folder)."""
        return f"{self.path} [series {self.series}]" if self.series else str(self.path)


def output_names(items: list[ImageInput]) -> list[str]:
    """A distinct output stem per input, from the paths (not from the order of the search: a name
    always says which input it is): an input whose :attr:`ImageInput.name` is shared takes its
    parent folders' names in front (``p1_CT``, ``p2_CT`` for ``p1/CT`` and ``p2/CT``, and ``p0_CT``
    beside them when ``p0/CT`` joins), or, where the files differ in type, their extensions behind
    (``scan_png``, ``scan_jpg``); the same input given twice is numbered (``brain``, ``brain_1``)."""
    def extension(item: ImageInput) -> str:  # what ImageInput.name leaves out of a file's name: "png", "nii_gz"
        name = item.path.name.lower()
        suffixes = NIFTI_SUFFIXES + IMAGE_SUFFIXES + (".dcm", ".dicom")
        return next((s.lstrip(".").replace(".", "_") for s in suffixes if name.endswith(s) and len(name) > len(s)), "")

    def stem(item: ImageInput, depth: int, typed: bool) -> str:
        parents = [p.name for p in item.path.resolve().parents][:depth][::-1]
        return "_".join([p for p in parents if p] + [item.name] + ([extension(item)] if typed and extension(item) else []))

    distinct = {(item.path.resolve(), item.series): item for item in items}
    depth, typed = dict.fromkeys(distinct, 0), dict.fromkeys(distinct, False)
    for _ in range(64):
        names = {key: stem(item, depth[key], typed[key]) for key, item in distinct.items()}
        groups: dict[str, list] = {}
        for key, name in names.items():
            groups.setdefault(name, []).append(key)
        shared = [keys for keys in groups.values() if len(keys) > 1]
        if not shared:
            break
        for keys in shared:
            if not all(typed[key] for key in keys) and (len({extension(distinct[key]) for key in keys}) > 1 or any(typed[key] for key in keys)):
                typed.update(dict.fromkeys(keys, True))  # scan.png, scan.jpg; scan.png typed beside scan_png.png
            else:
                depth.update({key: depth[key] + 1 for key in keys})
    taken = set(names.values())
    unique, given = [], set()
    for item in items:
        name = names[(item.path.resolve(), item.series)]
        if name in given:  # the same input again: the first free number
            name = next(f"{name}_{k}" for k in range(1, len(items) + 2) if f"{name}_{k}" not in taken)
            taken.add(name)
        given.add(name)
        unique.append(name)
    return unique


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM preamble or a ``.dcm``/``.dicom`` suffix."""
    import pydicom

    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        return bool(pydicom.misc.is_dicom(path))
    except OSError:
        return False


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def _dicom_header(path: Path):
    import pydicom

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, defer_size=1024)  # pixel data is read later, by the reader
    except Exception as err:  # pydicom raises many kinds for damaged files
        if isinstance(err, pydicom.errors.InvalidDicomError) and "File Meta Information" in str(err):
            raise _without_file_header(path) from err  # pydicom's message says "use force=True", which a medcam user cannot
        raise InputError(path, f"not a readable DICOM file ({type(err).__name__}: {err})") from err
    # a file cut short inside a sequence or encapsulated pixel data: pydicom warns and may return
    # an empty data set, which would otherwise pass for a file with no image
    short = [str(w.message) for w in caught if "end of file reached" in str(w.message).lower()]
    if short or (len(ds) == 0 and "MediaStorageSOPClassUID" in getattr(ds, "file_meta", {})):
        reason = short[0].split(" found in file")[0] if short else "no data set after the file header"
        raise InputError(path, f"DICOM file cut short or damaged ({reason}).")
    return ds


def _without_file_header(path: Path) -> InputError:
    """Why a file without DICOM's file header (preamble, 'DICM', file meta) is not read: a bare data set,
    which DCMTK can give the header (:class:`NotAnImage` where it holds no pixel data: a bare RT
    structure set in a folder is passed over), or no DICOM at all."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, defer_size=1024)  # which elements it holds; pixel data not read
        pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        bare = "SOPClassUID" in ds
    except Exception:
        bare = pixels = False
    if bare and not pixels:
        return NotAnImage(path, "a DICOM data set without the file header and with no pixel data; nothing to explain.")
    if bare:
        return InputError(path, "not a readable DICOM file: a DICOM data set without the file header (preamble, 'DICM' and "
                                "file meta information, which say how its pixels are encoded); write it as a DICOM file "
                                "first, e.g. with DCMTK: dcmconv <file> <new file>")
    return InputError(path, "not a readable DICOM file: no 'DICM' marker and no DICOM data set (empty, cut short, or another format?)")


def _check_dicom_image(path: Path, ds) -> None:
    sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "unknown"))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotAnImage(path, f"DICOM file has no pixel data (SOP class {sop}); nothing to explain.")
    if str(ds.get("SOPClassUID", "")) in ANNOTATION_SOP_CLASSES:  # a SEG beside its series in a study export
        raise NotAnImage(path, f"a DICOM {sop} object (an annotation of an image, not an image); nothing to explain.")
    if str(ds.get("SOPClassUID", "")) == RT_DOSE:
        raise NotAnImage(path, "a DICOM RT Dose object (a computed dose grid, not an image); nothing to explain.")


def _dicom_kind(path: Path, ds) -> str:
    """``"dicom_frames"`` for a multi-frame file (also an enhanced image of one frame, whose geometry
    lies in its functional groups, where MONAI's reader does not look), else ``"dicom"``."""
    multi = _number(path, ds, "NumberOfFrames", 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds
    return "dicom_frames" if multi else "dicom"


def _number(path: Path, ds, keyword: str, default: int | None = None) -> int | None:
    """An integer attribute of a DICOM header; a damaged value is an :class:`InputError` naming the file."""
    value = "?"
    try:
        value = ds.get(keyword, default)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError) as err:
        raise InputError(path, f"damaged DICOM header: {keyword} is {str(value)!r}, not a number.") from err


def _dicom_inputs(folder: Path, files: list[Path]) -> tuple[list[ImageInput], list[InputError]]:
    """The DICOM ``files`` of ``folder``, grouped by Series Instance UID: a series of one instance,
    or of projection images (radiographs, ultrasound, secondary captures: no position in space), is
    one input per file; a multi-slice series is one input (checked and sorted by Instance Number),
    told apart by its Series Number when the folder holds several; a multi-frame file is one input
    of its own. A file that is not a readable image is an error."""
    inputs: list[ImageInput] = []
    errors: list[InputError] = []
    groups: dict[str, list[tuple[Path, object]]] = {}
    for f in files:
        try:
            ds = _dicom_header(f)
            _check_dicom_image(f, ds)
            if _dicom_kind(f, ds) == "dicom_frames":  # a volume or a cine in one file
                inputs.append(ImageInput(f, "dicom_frames", (f,)))
                continue
        except InputError as err:
            errors.append(err)
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    volumes = {uid: headers for uid, headers in groups.items() if len(headers) > 1 and not _projections(headers)}
    labels = _series_labels(volumes)
    for uid, headers in groups.items():
        if uid not in volumes:
            inputs += [ImageInput(f, "dicom", (f,), series_uid=uid if "ImagePositionPatient" in ds else "") for f, ds in headers]
            continue
        try:
            inputs.append(_dicom_series(folder, headers, labels[uid] if len(volumes) > 1 else ""))
        except InputError as err:
            errors.append(err)
        except (TypeError, ValueError, AttributeError) as err:  # a damaged value pydicom parses only now
            errors.append(InputError(folder, f"damaged DICOM header in the series ({type(err).__name__}: {err})."))
    return inputs, errors


def _projections(headers: list[tuple[Path, object]]) -> bool:
    """Whether a series' images are projections or single pictures (none has an Image Position
    (Patient)), each its own 2D input rather than a slice of a volume."""
    return all("ImagePositionPatient" not in ds for _, ds in headers)


def _series_labels(volumes: dict[str, list[tuple[Path, object]]]) -> dict[str, str]:
    """Each series' Series Number, or its place among the folder's series where those are missing or shared."""
    numbers = {uid: str(headers[0][1].get("SeriesNumber", "") or "").strip() for uid, headers in volumes.items()}
    if all(numbers.values()) and len(set(numbers.values())) == len(numbers):
        return numbers
    return {uid: str(k + 1) for k, uid in enumerate(sorted(volumes, key=lambda u: str(volumes[u][0][0])))}


def _dicom_series(folder: Path, headers: list[tuple[Path, object]], series: str = "") -> ImageInput:
    """One multi-slice series, checked and sorted by Instance Number (by position along the slices'
    normal where the numbers are missing or run against it)."""
    where = f"{folder} [series {series}]" if series else folder
    uids = {f: str(ds.get("SOPInstanceUID") or "") for f, ds in headers}
    times = Counter(uids.values())
    copies = sorted(f.name for f, uid in uids.items() if uid and times[uid] > 1)
    if copies:  # an export holding one image twice (another transfer syntax, a re-send): not two slices
        raise InputError(where, f"files {_listed(copies)} hold the same image (one SOP Instance UID); keep one copy of "
                                "each image in the folder.")
    unplaced = sorted(f.name for f, ds in headers if "ImagePositionPatient" not in ds)
    if unplaced:
        raise InputError(where, f"slices {_listed(unplaced)} have no Image Position "
                                "(Patient) while the others do, so they are not one volume.")
    along = _along_normal(headers)  # each file's position along the slices' normal (None: not known)
    numbers = {f: _number(f, ds, "InstanceNumber") for f, ds in headers}
    missing = [f for f, n in numbers.items() if n is None]
    if missing:  # the positions may still order the slices
        if along is None:
            raise InputError(missing[0], "DICOM slice has no Instance Number and the series no usable orientation, so the slice order is unknown.")
        numbers = dict(along)
    count = Counter(numbers.values())
    if len(count) != len(numbers) and not missing:
        if along is not None and len({round(z, 3) for z in along.values()}) == len(along):
            numbers = dict(along)  # shared numbers (anonymised, converted): the positions order the slices
        else:
            shared = sorted(f.name for f, n in numbers.items() if count[n] > 1)
            raise InputError(where, f"slices {', '.join(shared)} share an Instance Number and no position along the "
                                    "slices orders them, so the slice order is unknown.")
    shapes = {(_number(f, ds, "Rows"), _number(f, ds, "Columns")) for f, ds in headers}
    if len(shapes) > 1:
        raise InputError(where, f"the series' slices differ in size {sorted(shapes)}.")
    try:
        orientations = [[float(v) for v in ds.get("ImageOrientationPatient", ())] for _, ds in headers]
    except (TypeError, ValueError) as err:
        raise InputError(where, f"damaged Image Orientation (Patient) in the series ({err}).") from err
    if any(len(o) != len(orientations[0]) or max((abs(a - b) for a, b in zip(o, orientations[0])), default=0) > 1e-3
           for o in orientations):
        raise InputError(where, "the series' slices differ in orientation (a localizer or a radial acquisition), so they "
                                 "are not one volume; give the slices one at a time.")
    if along is not None:  # the depth along the normal: also slices shifted within their plane to one depth
        position = {f: round(along[f], 3) for f, _ in headers}
    else:
        position = {f: tuple(round(float(v), 3) for v in ds.ImagePositionPatient) for f, ds in headers}
    at = Counter(position.values())
    if len(at) != len(headers):
        shared = sorted(f.name for f, p in position.items() if at[p] > 1)
        echoes = sorted({str(ds.get("EchoNumbers", "")) for _, ds in headers} - {""})
        kind = f"echoes {', '.join(echoes)}" if len(echoes) > 1 else "echoes, time points or acquisitions"
        raise InputError(where, f"slices {_listed(shared)} share a position: several "
                                f"{kind} in one series, which is not one volume; put each in a folder of its own.")
    ordered = tuple(sorted(numbers, key=numbers.get))
    if along is not None:
        z = [along[f] for f in ordered]
        if not (_monotonic(z) or _monotonic([-v for v in z])):
            # Instance Numbers that run against the positions (interleaved acquisitions): stack in space
            ordered = tuple(sorted(ordered, key=along.get))
    gaps = None if along is None else _uneven_slice_gaps(list(along.values()))
    return ImageInput(folder, "dicom_series", ordered, gaps, series, str(headers[0][1].get("SeriesInstanceUID", "")))


def _along_normal(headers: list[tuple[Path, object]]) -> dict[Path, float] | None:
    """Each file's position along its slice's normal (from its own Image Orientation and Position);
    ``None`` if any slice lacks them or has them damaged."""
    import numpy as np

    along = {}
    for f, ds in headers:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return None
        try:
            orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
            normal = np.cross(orientation[:3], orientation[3:])
            along[f] = float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)))
        except (TypeError, ValueError):  # damaged geometry: no claim about the order or the gaps
            return None
    return along


def _monotonic(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def _uneven_slice_gaps(positions: list[float]) -> str | None:
    """The range of gaps between a series' neighbouring slices (their positions along the normal,
    :func:`_along_normal`), ``"1.25-202.5 mm"``, when they differ by more than 1% and by more than
    0.025 mm (a NIfTI's regular grid cannot hold them), else ``None``. Positions written to 0.01 mm
    put up to 0.02 mm between the gaps of an even series (0.625 mm slices: 0.62 and 0.63 mm)."""
    import numpy as np

    gaps = np.diff(np.sort(positions))
    if len(gaps) < 2 or gaps.max() - gaps.min() <= max(0.01 * float(np.median(gaps)), 0.025):
        return None
    return f"{gaps.min():.4g}-{gaps.max():.4g} mm"


def find_inputs(path: str | Path, exclude: str | Path | None = None) -> tuple[list[ImageInput], list[InputError]]:
    """The images under ``path`` (a file or a folder, searched recursively) and the files that are not.

    A folder's multi-slice DICOM series is one input each, and each single-instance DICOM file or
    projection image (a radiograph, an ultrasound frame) another (:func:`_dicom_inputs`); NIfTI
    and PNG/JPEG/TIFF files are one image each. Files with no image in them come back as
    :class:`NotAnImage` errors. Hidden files and ``DICOMDIR`` are skipped, and so is the folder ``exclude`` (the
    output folder) when it lies inside ``path``, or, when it is one of the folders searched, the
    evidence files and ``summary.csv`` in it: a second run would explain its own outputs.

    Raises:
        InputError: ``path`` does not exist or cannot be read.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(root, "no such file or folder.")
    if root.is_file():
        try:
            return [_single_file(root)], []
        except InputError as err:
            return [], [err]
    try:
        folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    except OSError as err:
        raise InputError(root, f"cannot list the folder ({err}).") from err
    skip = Path(exclude).resolve() if exclude is not None else None
    inside = skip is not None and skip != root.resolve() and skip.is_relative_to(root.resolve())
    inputs: list[ImageInput] = []
    errors: list[InputError] = []
    for folder in folders:
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue
        here = folder.resolve()
        if inside and here.is_relative_to(skip):
            continue  # the output folder inside the input folder
        outputs_here = here == skip  # the output folder is the input folder: skip only the outputs in it
        dicoms: list[Path] = []
        for f in sorted(p for p in folder.iterdir() if p.is_file()):
            if f.name.startswith(".") or f.name == "DICOMDIR":
                continue
            if outputs_here and (f.name in ("summary.csv", "run.json") or _has_suffix(f, OUTPUT_SUFFIXES)):
                continue
            if _has_suffix(f, NIFTI_SUFFIXES):
                inputs.append(ImageInput(f, "nifti"))
            elif _has_suffix(f, IMAGE_SUFFIXES):
                inputs.append(ImageInput(f, "image"))
            elif is_dicom_file(f):
                dicoms.append(f)
            else:
                errors.append(NotAnImage(f, "not an image file (expected DICOM, NIfTI, PNG, JPEG or TIFF)."))
        if dicoms:
            found, bad = _dicom_inputs(folder, dicoms)
            inputs += found
            errors += bad
    return _split_series(inputs, errors)


def _split_series(inputs: list[ImageInput], errors: list[InputError]) -> tuple[list[ImageInput], list[InputError]]:
    """The inputs less the slices of a multi-slice DICOM series found in several folders (an export
    that caps the files per folder, or a copy): each folder's part would be explained as a volume of
    its own. Those become one error, naming the folders. Single slices of one series in several
    folders (key images sorted into folders) stay 2D inputs."""
    folders: dict[str, set[Path]] = {}
    volumes = {item.series_uid for item in inputs if item.kind == "dicom_series"}
    for item in inputs:
        if item.series_uid:
            folders.setdefault(item.series_uid, set()).add(item.files[0].parent)
    split = {uid for uid, where in folders.items() if len(where) > 1 and uid in volumes}
    for uid in sorted(split, key=lambda u: sorted(folders[u])):
        where = sorted(folders[uid])
        errors.append(InputError(where[0], f"the series {uid} is split over the folders {', '.join(map(str, where))}: "
                                           "each part would be explained as a volume of its own; put its slices in one folder."))
    return [i for i in inputs if i.series_uid not in split], errors


def input_datalist(path: str | Path, key: str = "image", check: bool = True) -> list[dict[str, str]]:
    """``[{key: input path, f"{key}_name": output name}, ...]`` for a MONAI ``Dataset``: each input
    under ``path`` (a DICOM series as its folder, or as the list of its files where it shares the
    folder with other series; :class:`~monai_medcam.transforms.LoadInput` reads either), and its
    output name (:func:`output_names`: distinct over all the inputs, so processes that share them out
    under ``torch.distributed`` never write one name; :class:`~monai_medcam.transforms.LoadInputd`
    puts it in the image's metadata). Files that are not images are logged and left out; with ``check``, so
    is every input that cannot be loaded (a truncated DICOM, undecodable pixel data, ...), each
    logged with its path and the problem: one bad file would otherwise stop a whole evaluator run
    when the ``Dataset`` reaches it. Checking loads every input once more (milliseconds to
    seconds each, against seconds per image for Med-CAM).

    Raises:
        InputError: ``path`` is not there or holds no input that can be explained (a run would otherwise
            do nothing, silently); also logged, as a bundle's config evaluation buries it in a long traceback.
    """
    try:
        inputs = _explainable_inputs(path, check)
    except InputError as err:
        logger.error("%s", err)
        raise
    # a series beside others in its folder: its files (MONAI's loaders also take a series as a file list)
    return [{key: [str(f) for f in item.files] if item.series else str(item.path), f"{key}_name": name}
            for item, name in zip(inputs, output_names(inputs))]


def _explainable_inputs(path: str | Path, check: bool) -> list[ImageInput]:
    """The inputs under ``path`` (with ``check``, those that load), the others logged and left out;
    an :class:`InputError` where ``path`` is not there or none is left."""
    inputs, errors = find_inputs(path)
    if check:
        readable = []
        for item in inputs:
            try:
                load_image(item)
            except InputError as err:
                errors.append(err)
            else:
                readable.append(item)
        inputs = readable
    for err in errors:
        logger.warning("%s (left out)", err)
    if not inputs:
        raise InputError(path, f"no image to explain here ({len(errors)} file(s) or folder(s) left out, logged above).")
    return inputs


def find_input(path: str | Path | list[str | Path]) -> ImageInput:
    """The one input at ``path``: an image file, a folder holding one DICOM series, or the list of
    one series' files (as :func:`input_datalist` gives a series that shares its folder).

    Raises:
        InputError: ``path`` is not an image, or holds no input or several.
    """
    if isinstance(path, (list, tuple)):
        files = [Path(f) for f in path]
        missing = [f for f in files if not f.is_file()]
        if not files or missing:
            raise InputError(missing[0] if missing else Path("."), "no such file (a series given as its list of files).")
        folder = files[0].parent  # labelled as find_inputs labels the folder's series
        found, errors = _dicom_inputs(folder, sorted(f for f in folder.iterdir() if f.is_file() and is_dicom_file(f)))
        inputs = [item for item in found if set(item.files) == set(files)]
        if len(inputs) != 1:
            problems = [e for e in errors if e.path in files or e.path == folder]
            raise problems[0] if problems else InputError(folder, f"the {len(files)} files given are not one series of this folder.")
        return inputs[0]
    inputs, errors = find_inputs(path)
    if len(inputs) == 1:
        return inputs[0]
    if not inputs and errors:
        raise errors[0]
    raise InputError(path, f"expected one image or DICOM series, found {len(inputs)}.")


def _single_file(path: Path) -> ImageInput:
    if _has_suffix(path, NIFTI_SUFFIXES):
        return ImageInput(path, "nifti")
    if _has_suffix(path, IMAGE_SUFFIXES):
        return ImageInput(path, "image")
    if is_dicom_file(path):
        ds = _dicom_header(path)
        _check_dicom_image(path, ds)
        return ImageInput(path, _dicom_kind(path, ds), (path,))
    raise NotAnImage(path, "not an image file (expected DICOM, NIfTI, PNG, JPEG or TIFF).")


def _reader(item: ImageInput):
    from monai.data import NibabelReader, PILReader

    if item.kind == "dicom_series":
        return _SeriesReader(item.files)
    if item.kind == "dicom":
        return PydicomReader()
    if item.kind == "nifti":
        return NibabelReader()
    return PILReader()


def _check_single_page(path: Path) -> None:
    """PIL reads a multi-page TIFF (or an animated PNG) as its first page: refuse it instead."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            pages = int(getattr(image, "n_frames", 1))
    except Exception:  # noqa: BLE001 - unreadable: the reader says why, below
        return
    if pages > 1:
        raise InputError(path, f"{pages} pages or frames; only single images are read (save a stack as NIfTI, or each page on its own).")


def _reason(err: BaseException) -> str:
    """``"Kind: message"`` on one line. When the chosen reader fails, MONAI's ``LoadImage`` tries every
    registered reader and reports all their tracebacks in one message: the first error line in it
    is the chosen reader's."""
    text = str(err).strip()
    if "\n" not in text:
        return f"{type(err).__name__}: {text}"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[\w.]+(Error|Exception|error): ", line):
            return _with_details(line.strip(), lines[i + 1 :])
    return _with_details(f"{type(err).__name__}: {lines[0]}", lines[1:])


def _with_details(line: str, rest: list[str]) -> str:
    """``line``, and where it ends in a colon the indented lines after it (pydicom lists there the
    decoder plugins that are missing and what to install)."""
    if not line.endswith(":"):
        return line
    details = []
    for extra in rest:
        if not extra.startswith((" ", "\t")) or not extra.strip():
            break
        details.append(extra.strip())
    return f"{line} {'; '.join(details)}" if details else line


class _SeriesReader(PydicomReader):
    """MONAI's ``PydicomReader`` on exactly the series' ``files`` (``(path, ...)``). Given the folder,
    it would try every file in it and list them with ``glob``, which takes a folder name holding
    ``[``, ``]``, ``*`` or ``?`` for a pattern and then finds nothing."""

    def __init__(self, files: tuple[Path, ...]) -> None:
        super().__init__()
        self.series_files = [str(f) for f in files]

    def read(self, data, **kwargs):
        import pydicom

        options = {**self.kwargs, **kwargs}
        slices = []
        for f in self.series_files:
            try:
                slices.append(pydicom.dcmread(f, **options))
            except Exception as err:  # name the slice, not only the folder
                raise InputError(f, f"cannot read this slice of the series ({type(err).__name__}: {err}).") from err
        for k, ds in enumerate(slices):  # in memory: MONAI stacks by Instance Number, so it keeps the files' order
            ds.InstanceNumber = k + 1  # (by position where the numbers ran against it or were missing)
        self.filenames, self.has_series = [self.series_files], True
        return slices


def _undecodable_slice(files: tuple[Path, ...]) -> tuple[Path, str] | None:
    """The first of DICOM ``files`` whose pixel data pydicom cannot decode (after MONAI's reader
    failed on them), and pydicom's reason: MONAI's own message may only say "does not have pixel_array"."""
    import pydicom

    for f in files:
        try:
            pydicom.dcmread(f).pixel_array
        except Exception as err:  # noqa: BLE001 - any failure marks the slice
            return f, _reason(err)
    return None


def _per_slice(item: ImageInput, image: MetaTensor, apply, what: str) -> MetaTensor:
    """``image`` ``(1, X, Y[, Z])`` of stored values -> ``(C, X, Y[, Z])``, each slice through
    ``apply(plane, header)``: its plane ``(X, Y)`` as integers and its own file's header (read up to
    the pixel data: the lookup tables lie before it) -> ``(C, X, Y)``. A failure names the file and ``what``."""
    import numpy as np
    import pydicom

    values = image[0].as_tensor().numpy()
    planes = [values] if values.ndim == 2 else [values[..., k] for k in range(values.shape[-1])]
    slices = []
    for plane, f in zip(planes, item.files):
        try:
            slices.append(apply(plane.astype(np.int64), pydicom.dcmread(f, stop_before_pixels=True)))
        except Exception as err:  # noqa: BLE001 - a damaged or missing table
            raise InputError(f, f"{what} ({type(err).__name__}: {err}).") from err
    return MetaTensor(slices[0] if values.ndim == 2 else torch.stack(slices, dim=-1), meta=image.meta)


def _palette_to_rgb(item: ImageInput, image: MetaTensor) -> MetaTensor:
    """A PALETTE COLOR image ``(1, X, Y[, Z])`` of palette indices -> its colours ``(3, X, Y[, Z])``
    through each file's lookup table (pydicom's ``apply_color_lut``), in [0, 1]."""
    import numpy as np
    from pydicom.pixels import apply_color_lut

    def colours(plane, ds) -> torch.Tensor:
        rgb = apply_color_lut(plane.T, ds)  # (rows, columns, 3); the plane is (columns, rows)
        top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0  # 8- or 16-bit table entries
        return torch.from_numpy(rgb.transpose(2, 1, 0).astype(np.float32) / top)

    return _per_slice(item, image, colours, "PALETTE COLOR image whose lookup table cannot be applied")


def _modality_lut(item: ImageInput, image: MetaTensor) -> MetaTensor:
    """Stored values ``(1, X, Y[, Z])`` -> through each file's Modality LUT Sequence (pydicom's
    ``apply_modality_lut``), as highdicom applies it to multi-frame files."""
    import numpy as np
    from pydicom.pixels import apply_modality_lut

    def mapped(plane, ds) -> torch.Tensor:
        return torch.from_numpy(apply_modality_lut(plane, ds).astype(np.float32))[None]

    return _per_slice(item, image, mapped, "Modality LUT that cannot be applied")


def _functional(ds, group, sequence: str, keyword: str):
    """``keyword`` of a multi-frame file's frame: from its per-frame ``group``, else the shared groups'."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    for where in (group, shared[0] if shared else None):
        items = where.get(sequence) if where is not None else None
        if items and keyword in items[0]:
            return items[0][keyword].value
    return None


def _frame_geometry(path: Path, ds, count: int):
    """A multi-frame file's frame positions ``(N, 3)``, orientation ``(6,)`` and pixel spacing ``(2,)``
    (mm, LPS) from its functional groups (enhanced CT/MR/PET, legacy-converted series), or ``None``
    where its frames have no positions in space (a cine, a multi-frame capture).

    Raises:
        InputError: positions on some frames only, orientations that differ, or damaged values.
    """
    import numpy as np

    groups = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if not groups:
        return None
    if len(groups) != count:
        raise InputError(path, f"damaged DICOM header: {len(groups)} per-frame functional groups for {count} frames.")
    positions = [_functional(ds, g, "PlanePositionSequence", "ImagePositionPatient") for g in groups]
    if all(p is None for p in positions):
        return None
    placed = [k + 1 for k, p in enumerate(positions) if p is not None]
    if len(placed) != count:
        raise InputError(path, f"only frames {_listed(placed)} of {count} have an Image Position (Patient), so the frames are not one volume.")
    try:
        orientations = np.array([_functional(ds, g, "PlaneOrientationSequence", "ImageOrientationPatient")
                                 or ds.get("ImageOrientationPatient") for g in groups], dtype=float)
        spacings = np.array([_functional(ds, g, "PixelMeasuresSequence", "PixelSpacing") or ds.get("PixelSpacing")
                             or (1.0, 1.0) for g in groups], dtype=float)
        positions = np.array(positions, dtype=float)
    except (TypeError, ValueError) as err:
        raise InputError(path, f"damaged frame geometry (Image Position/Orientation or Pixel Spacing: {err}).") from err
    if orientations.shape != (count, 6) or positions.shape != (count, 3) or spacings.shape != (count, 2):
        raise InputError(path, "damaged frame geometry: Image Orientation (Patient) missing or not 6 values, "
                               "Image Position (Patient) not 3 values or Pixel Spacing not 2.")
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise InputError(path, "the frames differ in orientation (a localizer or a radial acquisition), so they are not one volume.")
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise InputError(path, "the frames differ in pixel spacing, so they are not one volume.")
    return positions, orientations[0], spacings[0]


def _thickness(ds) -> float:
    """A one-frame enhanced image's Slice Thickness (its Pixel Measures), 1 mm where it has none."""
    groups = ds.get("PerFrameFunctionalGroupsSequence") or [None]
    try:
        return float(_functional(ds, groups[0], "PixelMeasuresSequence", "SliceThickness") or 1.0)
    except (TypeError, ValueError):
        return 1.0


def _listed(items: list, most: int = 4) -> str:
    """``"a, b, c, d ..."``: the first ``most`` of ``items`` (file names, frame numbers)."""
    return ", ".join(map(str, items[:most])) + (" ..." if len(items) > most else "")


def _read_frames(item: ImageInput) -> MetaTensor:
    """A multi-frame DICOM file -> ``(C, X, Y, N)`` in MONAI's DICOM axis order, float32.

    Frames with positions in space are a volume's slices, ordered along their normal, with the
    affine MONAI gives the same slices as a series (RAS); ``meta[SOURCE_FRAMES]`` holds each slice's
    frame number. Frames without (a cine) keep the file's order and an identity affine, and
    ``meta[NOT_A_VOLUME]`` says why. Pixel values as for single-frame DICOM: the modality rescale
    applied (from the functional groups), colour as RGB, a palette through its lookup table in [0, 1].

    Raises:
        InputError: undecodable frames, damaged geometry, or frames that share a position (several
            echoes or time points in one file).
    """
    import numpy as np
    import pydicom

    path = item.path
    try:
        import highdicom as hd
    except ImportError as err:
        raise InputError(path, "a multi-frame DICOM file is read with highdicom, which is not installed: "
                               "pip install 'monai-medcam[dicom]'.") from err
    try:
        ds = pydicom.dcmread(path)
        count = _number(path, ds, "NumberOfFrames", 1)
        geometry = _frame_geometry(path, ds, count)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds for damaged files
        raise InputError(path, f"cannot read the image ({type(err).__name__}: {err}).") from err
    affine = np.eye(4)
    order = list(range(count))
    meta: dict[str, object] = {}
    if geometry is None and count > 1:
        meta[NOT_A_VOLUME] = f"{count} frames without a position in space each (a cine or a multi-frame capture)"
    elif geometry is not None:
        positions, orientation, (row_spacing, column_spacing) = geometry
        normal = np.cross(orientation[:3], orientation[3:])
        along = positions @ normal
        order = sorted(order, key=lambda k: along[k])
        at = Counter(np.round(along, 3))  # also frames shifted within their plane to the same depth
        shared = [k + 1 for k in range(count) if at[np.round(along[k], 3)] > 1]
        if shared:
            raise InputError(path, f"frames {_listed(shared)} share a position: several echoes, time points or acquisitions "
                                   "in one file, which is not one volume; split it (e.g. dcm2niix) and explain each.")
        first, last = positions[order[0]], positions[order[-1]]
        affine[:3, 0] = orientation[:3] * column_spacing  # axis 0 runs along a row (across the columns)
        affine[:3, 1] = orientation[3:] * row_spacing
        affine[:3, 2] = (last - first) / (count - 1) if count > 1 else normal * _thickness(ds)
        affine[:3, 3] = first
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS, as MONAI reads DICOM
        gaps = _uneven_slice_gaps([float(along[k]) for k in order])
        if gaps:
            meta[UNEVEN_SLICES] = gaps
    if not ds.original_encoding[1]:  # highdicom parses little-endian datasets only
        raise InputError(path, "a multi-frame DICOM file in the retired big-endian transfer syntax; convert it to "
                               "little endian (e.g. dcmconv +te, or gdcmconv) and explain that.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames = hd.Image.from_dataset(ds, copy=False).get_frames(
                [k + 1 for k in order], dtype=np.float32, apply_real_world_transform=False, apply_presentation_lut=False,
                apply_icc_profile=False,
            )  # (N, rows, columns[, 3]); MONOCHROME1 stays as stored (inverted later), no ICC: as single frames are read
    except Exception as err:  # noqa: BLE001 - a decoder missing, truncated pixel data, ...
        raise InputError(path, f"cannot read the image ({type(err).__name__}: {err}).") from err
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":  # the lookup table's 8- or 16-bit entries -> [0, 1]
        bits = int(ds.get("RedPaletteColorLookupTableDescriptor", [0, 0, 16])[2])
        frames = frames / float(2 ** (16 if bits > 8 else 8) - 1)
    data = torch.from_numpy(np.ascontiguousarray(frames.transpose(3, 2, 1, 0) if frames.ndim == 4 else frames.transpose(2, 1, 0)[None]))
    if count == 1:  # an enhanced image of one frame: a 2D image, as MONAI reads a single-frame one
        data = data[..., 0]
    meta.update({"affine": torch.as_tensor(affine), "original_affine": affine.copy(), "filename_or_obj": str(path),
                 SOURCE_FILES: [str(path)], SOURCE_FRAMES: [k + 1 for k in order],
                 PHOTOMETRIC: "RGB" if frames.ndim == 4 else photometric})
    return MetaTensor(data, meta=meta)


def load_image(item: ImageInput) -> MetaTensor:
    """Read ``item`` as a float32 channel-first MetaTensor ``(C, *spatial)`` with its affine.

    Raises:
        InputError: the file cannot be read or decoded (truncated, corrupt, unsupported).
    """
    from monai.transforms import LoadImage

    if not item.path.exists():
        raise InputError(item.path, "no such file or folder.")
    if item.kind == "image":
        _check_single_page(item.path)
    if item.kind == "dicom_frames":
        return _checked(_read_frames(item), item)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=torch.float32)
            image = loader(str(item.path), reader=_reader(item))  # this reader only: no fallback to MONAI's others
    except InputError:
        raise  # a slice of a series, named
    except Exception as err:  # readers raise many kinds for damaged files
        reason = _reason(err.__cause__ or err)
        culprit = _undecodable_slice(item.files or (item.path,)) if item.kind in ("dicom", "dicom_series") else None
        if culprit is not None and "pixel_array" in reason:  # MONAI's reader hides pydicom's reason
            reason = culprit[1]
        if culprit is not None and item.kind == "dicom_series":  # name the slice (its pixel data truncated, say), not only the folder
            raise InputError(culprit[0], f"cannot read this slice of the series {item.label} ({reason}).") from err
        raise InputError(item.path, f"cannot read the image ({reason}).") from err
    if not isinstance(image, MetaTensor):
        image = MetaTensor(image)
    if item.kind.startswith("dicom"):
        header = _dicom_header(item.files[0])
        if int(header.get("SamplesPerPixel", 1)) > 1 and image.ndim == 4 and image.shape[0] == 1:
            # PydicomReader leaves colour samples last, as if they were a spatial axis
            image = MetaTensor(image[0].as_tensor().movedim(-1, 0), meta=image.meta)
        image.meta[SOURCE_FILES] = [str(f) for f in item.files]
        if item.uneven_gaps:
            image.meta[UNEVEN_SLICES] = item.uneven_gaps
        image.meta[PHOTOMETRIC] = str(header.get("PhotometricInterpretation", ""))
        if image.meta[PHOTOMETRIC] == "PALETTE COLOR":
            image = _palette_to_rgb(item, image)
        elif header.get("ModalityLUTSequence") and "RescaleSlope" not in header:  # MONAI applies a rescale only
            image = _modality_lut(item, image)
        if item.kind == "dicom":
            _slice_normal(image, header)
    return _checked(image, item)


def _slice_normal(image: MetaTensor, header) -> None:
    """Give a single DICOM slice's affine its third column, the slice normal times the slice thickness
    (RAS), where it has an orientation: MONAI's reader leaves (0, 0, 1) there, which for a sagittal
    or coronal slice lies in the slice's own plane (a singular affine: its NIfTI is misplaced)."""
    import numpy as np

    try:
        orientation = np.array([float(v) for v in header.get("ImageOrientationPatient") or ()])
        thickness = float(header.get("SliceThickness") or header.get("SpacingBetweenSlices") or 1.0)
    except (TypeError, ValueError):
        return  # a damaged orientation: the reader's affine stands
    if orientation.shape != (6,) or not np.isfinite(orientation).all() or not np.isfinite(thickness) or thickness <= 0:
        return
    normal = np.cross(orientation[:3], orientation[3:])
    if np.linalg.norm(normal) < 1e-3:
        return
    affine = image.affine.clone()
    affine[:3, 2] = torch.as_tensor(np.array([-1.0, -1.0, 1.0]) * normal / np.linalg.norm(normal) * thickness)  # LPS -> RAS
    image.affine = affine


def _checked(image: MetaTensor, item: ImageInput) -> MetaTensor:
    """``image`` labelled with ``item``, after checking it is 2D or 3D and finite."""
    image.meta[INPUT_KIND] = item.kind
    image.meta[INPUT_NAME] = item.name
    image.meta[INPUT_LABEL] = item.label
    if image.ndim - 1 not in (2, 3):
        raise InputError(item.path, f"expected a 2D or 3D image; got spatial shape {tuple(image.shape[1:])}.")
    if not torch.isfinite(image).all():
        raise InputError(item.path, "the image holds NaN or Inf values.")
    return image
