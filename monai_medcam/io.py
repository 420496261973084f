"""Finding and reading the images to explain: DICOM files and series, NIfTI, PNG/JPEG/TIFF.

Reading goes through MONAI's ``LoadImage`` with the reader chosen explicitly (``PydicomReader``
for DICOM, so ITK is not needed; ``NibabelReader``; ``PILReader``). Every image comes back as a
channel-first MetaTensor ``(C, *spatial)`` with its affine; a DICOM image also carries its source
files in the order of its last spatial axis (``meta[SOURCE_FILES]``), which the DICOM SEG writer
needs to reference the right instance for each frame.

Array axes follow MONAI's convention for DICOM (``swap_ij``): spatial axis 0 runs along the
columns of the DICOM image, axis 1 along the rows, axis 2 through the slices.
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
INPUT_KIND = "medcam_input_kind"
PHOTOMETRIC = "medcam_photometric"
INPUT_NAME = "medcam_input_name"
INPUT_LABEL = "medcam_input_label"  # the input's path, and its series where several share a folder
UNEVEN_SLICES = "medcam_uneven_slice_gaps"  # a DICOM series' range of slice gaps, when they differ

# DICOM objects with pixel data that are annotations, not images: Segmentation, Surface/Label Map Segmentation
ANNOTATION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.5", "1.2.840.10008.5.1.4.1.1.66.7")
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
        kind: ``"dicom_series"``, ``"dicom"``, ``"nifti"`` or ``"image"``.
        files: for a DICOM series, its files in slice order: by Instance Number, or by position
            along the slices' normal where the numbers run against it (interleaved acquisitions).
        uneven_gaps: for a DICOM series whose slice gaps differ, their range (``"1.25-202.5 mm"``).
        series: for a DICOM series that shares its folder with other series, which one it is
            (``"4"``, its Series Number; ``""`` when the folder holds only this series).
    """

    path: Path
    kind: str
    files: tuple[Path, ...] = ()
    uneven_gaps: str | None = None
    series: str = ""

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
    beside them when ``p0/CT`` joins); the same input given twice is numbered (``brain``, ``brain_1``)."""
    def stem(item: ImageInput, depth: int) -> str:
        parents = [p.name for p in item.path.resolve().parents][:depth][::-1]
        return "_".join([p for p in parents if p] + [item.name])

    distinct = {(item.path.resolve(), item.series): item for item in items}
    names = {key: stem(item, 0) for key, item in distinct.items()}
    for depth in range(1, 64):
        count = Counter(names.values())
        shared = [key for key, name in names.items() if count[name] > 1]
        if not shared:
            break
        names.update({key: stem(distinct[key], depth) for key in shared})
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
        return pydicom.dcmread(path, defer_size=1024)  # pixel data is read later, by the reader
    except Exception as err:  # pydicom raises many kinds for damaged files
        raise InputError(path, f"not a readable DICOM file ({type(err).__name__}: {err})") from err


def _check_dicom_image(path: Path, ds) -> None:
    sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "unknown"))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotAnImage(path, f"DICOM file has no pixel data (SOP class {sop}); nothing to explain.")
    if str(ds.get("SOPClassUID", "")) in ANNOTATION_SOP_CLASSES:  # a SEG beside its series in a study export
        raise NotAnImage(path, f"a DICOM {sop} object (an annotation of an image, not an image); nothing to explain.")
    frames = _number(path, ds, "NumberOfFrames", 1)
    if frames > 1:
        raise InputError(path, f"multi-frame DICOM ({frames} frames) is not supported yet; convert it to NIfTI "
                               "(e.g. with dcm2niix) and explain that.")


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
    told apart by its Series Number when the folder holds several. A file that is not a readable
    single-frame image is an error."""
    inputs: list[ImageInput] = []
    errors: list[InputError] = []
    groups: dict[str, list[tuple[Path, object]]] = {}
    for f in files:
        try:
            ds = _dicom_header(f)
            _check_dicom_image(f, ds)
        except InputError as err:
            errors.append(err)
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    volumes = {uid: headers for uid, headers in groups.items() if len(headers) > 1 and not _projections(headers)}
    labels = _series_labels(volumes)
    for uid, headers in groups.items():
        if uid not in volumes:
            inputs += [ImageInput(f, "dicom", (f,)) for f, _ in headers]
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
    unplaced = sorted(f.name for f, ds in headers if "ImagePositionPatient" not in ds)
    if unplaced:
        raise InputError(where, f"slices {', '.join(unplaced[:4])}{' ...' if len(unplaced) > 4 else ''} have no Image Position "
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
        shared = sorted(f.name for f, n in numbers.items() if count[n] > 1)
        raise InputError(where, f"slices {', '.join(shared)} share an Instance Number, so the slice order is unknown.")
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
    position = {f: tuple(round(float(v), 3) for v in ds.ImagePositionPatient) for f, ds in headers}
    at = Counter(position.values())
    if len(at) != len(headers):
        shared = sorted(f.name for f, p in position.items() if at[p] > 1)
        echoes = sorted({str(ds.get("EchoNumbers", "")) for _, ds in headers} - {""})
        kind = f"echoes {', '.join(echoes)}" if len(echoes) > 1 else "echoes, time points or acquisitions"
        raise InputError(where, f"slices {', '.join(shared[:4])}{' ...' if len(shared) > 4 else ''} share a position: several "
                                f"{kind} in one series, which is not one volume; put each in a folder of its own.")
    ordered = tuple(sorted(numbers, key=numbers.get))
    if along is not None:
        z = [along[f] for f in ordered]
        if not (_monotonic(z) or _monotonic([-v for v in z])):
            # Instance Numbers that run against the positions (interleaved acquisitions): stack in space
            ordered = tuple(sorted(ordered, key=along.get))
    gaps = None if along is None else _uneven_slice_gaps(list(along.values()))
    return ImageInput(folder, "dicom_series", ordered, gaps, series)


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
    :func:`_along_normal`), ``"1.25-202.5 mm"``, when they differ by more than 1% (a NIfTI's
    regular grid cannot hold them), else ``None``."""
    import numpy as np

    gaps = np.diff(np.sort(positions))
    if len(gaps) < 2 or gaps.max() - gaps.min() <= max(0.01 * float(np.median(gaps)), 1e-3):
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
            if outputs_here and (f.name == "summary.csv" or _has_suffix(f, OUTPUT_SUFFIXES)):
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
    return inputs, errors


def input_datalist(path: str | Path, key: str = "image", check: bool = True) -> list[dict[str, str]]:
    """``[{key: input path}, ...]`` for a MONAI ``Dataset``: each input under ``path`` (a DICOM
    series as its folder, or as the list of its files where it shares the folder with other
    series; :class:`~monai_medcam.transforms.LoadInput` reads either). Files that are not images are logged and left out; with ``check``, so
    is every input that cannot be loaded (a truncated DICOM, undecodable pixel data, ...), each
    logged with its path and the problem: one bad file would otherwise stop a whole evaluator run
    when the ``Dataset`` reaches it. Checking loads every input once more (milliseconds to
    seconds each, against seconds per image for Med-CAM).

    Raises:
        InputError: ``path`` holds no input that can be explained (a run would otherwise do nothing, silently).
    """
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
    # a series beside others in its folder: its files (MONAI's loaders also take a series as a file list)
    return [{key: [str(f) for f in item.files] if item.series else str(item.path)} for item in inputs]


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
        _check_dicom_image(path, _dicom_header(path))
        return ImageInput(path, "dicom", (path,))
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


def _undecodable_slice(files: tuple[Path, ...]) -> Path | None:
    """The first of a series' files whose pixel data cannot be decoded (after the series failed to load)."""
    import pydicom

    for f in files:
        try:
            pydicom.dcmread(f).pixel_array
        except Exception:  # noqa: BLE001 - any failure marks the slice
            return f
    return None


def _palette_to_rgb(item: ImageInput, image: MetaTensor) -> MetaTensor:
    """A PALETTE COLOR image ``(1, X, Y[, Z])`` of palette indices -> its colours ``(3, X, Y[, Z])``
    through each file's lookup table (pydicom's ``apply_color_lut``), in [0, 1]."""
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_color_lut

    indices = image[0].as_tensor().numpy()
    planes = [indices] if indices.ndim == 2 else [indices[..., k] for k in range(indices.shape[-1])]
    colours = []
    for plane, f in zip(planes, item.files):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)  # the lookup table lies before the pixel data
            rgb = apply_color_lut(plane.T.astype(np.int64), ds)  # (rows, columns, 3); the plane is (columns, rows)
        except Exception as err:  # noqa: BLE001 - a damaged or missing lookup table
            raise InputError(f, f"PALETTE COLOR image whose lookup table cannot be applied ({type(err).__name__}: {err}).") from err
        top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0  # 8- or 16-bit table entries
        colours.append(torch.from_numpy(rgb.transpose(2, 1, 0).astype(np.float32) / top))
    data = colours[0] if indices.ndim == 2 else torch.stack(colours, dim=-1)
    return MetaTensor(data, meta=image.meta)


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=torch.float32)
            image = loader(str(item.path), reader=_reader(item))  # this reader only: no fallback to MONAI's others
    except InputError:
        raise  # a slice of a series, named
    except Exception as err:  # readers raise many kinds for damaged files
        reason = _reason(err.__cause__ or err)
        culprit = _undecodable_slice(item.files) if item.kind == "dicom_series" else None
        if culprit is not None:  # name the slice (its pixel data truncated, say), not only the folder
            raise InputError(culprit, f"cannot read this slice of the series {item.label} ({reason}).") from err
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
    image.meta[INPUT_KIND] = item.kind
    image.meta[INPUT_NAME] = item.name
    image.meta[INPUT_LABEL] = item.label
    if image.ndim - 1 not in (2, 3):
        raise InputError(item.path, f"expected a 2D or 3D image; got spatial shape {tuple(image.shape[1:])}.")
    if not torch.isfinite(image).all():
        raise InputError(item.path, "the image holds NaN or Inf values.")
    return image
