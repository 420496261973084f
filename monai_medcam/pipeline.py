"""The explain job behind ``medcam explain``: files in, evidence files and a summary table out.

Data flow, one input at a time::

    io.find_inputs -> io.load_image (C, *S) -> classifier space: intensities to [0, 1], a volume
    reoriented to the classifier's axis codes (if given), channels matched, 2D slices of a volume
    for a 2D classifier, resized to the classifier's size
    (or, with a bundle's own preprocessing: its transforms, as in the classifier's training)
    -> batches of same-shaped images (across inputs) -> MedCAM.explain
    -> masks resized back (nearest) and reoriented back to the source geometry
    (or inverted through the bundle's transforms, MONAI's Invertd)
    -> writers (SEG, NIfTI, PNG) -> rows

An input that cannot be read or explained is reported with its path and the problem; the others
go on. Outputs are written atomically as soon as an input is complete.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from tqdm.auto import tqdm

from monai_medcam.classifiers import class_indices
from monai_medcam.engine import MedCAM
from monai_medcam.io import INPUT_KIND, NOT_A_VOLUME, PHOTOMETRIC, ImageInput, InputError, load_image, output_names
from monai_medcam.orientation import check_orientation, oriented_shape, reorient, reorientation, source_slice
from monai_medcam.preprocessing import BundlePreprocessing
from monai_medcam.provenance import RUN_RECORD, remove_run_record, run_record, write_run_record
from monai_medcam.visualize import class_names_map, grad_cam, grad_cam_layer
from monai_medcam.writers import (EVIDENCE_SUFFIXES, FORMATS, SEG_NEEDS_DICOM, OutputError, OutputsLocked, atomic_path, evidence_class,
                                  only_writer, output_formats, panel_slices, remove_temporaries, seg_problem, write_outputs)

__all__ = [
    "ExplainReport", "explain_inputs", "output_formats", "to_classifier_space", "back_to_source", "write_rows_csv", "FORMATS",
    "ROW_FIELDS", "check_classifier", "bundle_prepared",
]

logger = logging.getLogger(__name__)

ROW_FIELDS = (
    "input", "slice", "evidence", "label", "prob_input", "prob_evidence", "prob_background", "area", "verified", "settled", "vacuous", "steps",
    "retries", "seconds",
)


@dataclass
class ExplainReport:
    """What a job did.

    Attributes:
        rows: one dict per explained image (a 2D image, a volume, or one slice of a volume
            explained slice by slice), with the fields of ``ROW_FIELDS``.
        written: output files, per input path.
        failures: input path -> the problem.
    """

    rows: list[dict[str, object]] = field(default_factory=list)
    written: dict[str, list[Path]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def _fit_channels(image: torch.Tensor, channels: int | None, path: Path, kind: str | None = None) -> torch.Tensor:
    """``image`` ``(C, *S)`` with the classifier's ``channels``: grey repeated, colour averaged, alpha
    dropped. The channels of a NIfTI (a 4D file's volumes: time points, echoes, modalities) are
    never mixed: they must match the classifier's."""
    have = image.shape[0]
    if channels is None or have == channels:
        return image
    if kind == "nifti" and have > 1:
        raise InputError(path, f"a 4D NIfTI with {have} volumes (time points or components) for a classifier that takes "
                               f"{channels} channel(s); give one 3D volume (e.g. split it with nibabel) or matching channels.")
    if have == 2 and channels in (1, 3):  # grey + alpha
        return image[:1].expand(channels, *image.shape[1:])
    if have == 4 and channels == 3:
        return image[:3]  # RGBA -> RGB
    if have == 1:
        return image.expand(channels, *image.shape[1:])
    if channels == 1 and have in (3, 4):
        return image[:3].mean(0, keepdim=True)
    raise InputError(path, f"the image has {have} channels but the classifier takes {channels}.")


def to_classifier_space(
    image: torch.Tensor, spatial_dims: int, channels: int | None, size: Sequence[int] | None, path: Path,
    orientation: str | None = None,
) -> list[torch.Tensor]:
    """The classifier's inputs for ``image`` ``(C, *S)``: one ``(C', *size)`` tensor, or one per slice.

    Intensities are stretched to [0, 1] over the whole input (MONOCHROME1 DICOM is inverted first).
    A volume is reoriented to ``orientation`` (axis codes such as ``"RAS"``, as the classifier saw
    volumes in training, e.g. through MONAI's ``Orientationd``) before it is sliced or resized.
    """
    data = image.as_tensor() if isinstance(image, MetaTensor) else image
    data = data.float()
    if isinstance(image, MetaTensor) and image.meta.get(PHOTOMETRIC) == "MONOCHROME1":
        data = data.max() - data
    low, high = data.min(), data.max()
    data = (data - low) / (high - low).clamp_min(1e-8)
    ornt = reorientation(image, orientation)
    sliced_along = None if ornt is None else int(np.argsort(ornt[:, 0])[2])  # the source axis that ends up last
    if spatial_dims == 2 and sliced_along not in (None, 2):
        raise InputError(path, f"reoriented to {orientation}, the volume would be sliced along its axis {sliced_along}, across its own "
                               f"slices (axis 2): a 2D classifier's evidence per slice would not be the source's slices. Give an "
                               f"orientation that keeps the slice axis last (or none), or reformat the volume.")
    data = reorient(data, ornt)
    data = _fit_channels(data, channels, path, image.meta.get(INPUT_KIND) if isinstance(image, MetaTensor) else None)
    dims = data.ndim - 1
    if spatial_dims == 2 and dims == 3:
        pieces = [data[..., k] for k in range(data.shape[-1])]
    elif spatial_dims == dims and dims == 3 and isinstance(image, MetaTensor) and image.meta.get(NOT_A_VOLUME):
        raise InputError(path, f"{image.meta[NOT_A_VOLUME]}, not a volume: a 3D classifier cannot explain it "
                               "(a 2D classifier explains its frames one by one).")
    elif spatial_dims == dims:
        pieces = [data]
    else:
        raise InputError(path, f"a {spatial_dims}D classifier cannot explain a {dims}D image of shape {tuple(data.shape[1:])}.")
    if size is not None:
        size = _sides(size, spatial_dims)
        # 2D: antialiased, so a large radiograph squeezed to a small classifier input is not aliased
        # (torch has no antialiased trilinear)
        mode, antialias = ("bilinear", True) if spatial_dims == 2 else ("trilinear", False)
        pieces = [F.interpolate(p[None], size=size, mode=mode, align_corners=False, antialias=antialias)[0] for p in pieces]
    return pieces


def bundle_prepared(
    preprocessing: BundlePreprocessing, image: MetaTensor, spatial_dims: int, channels: int | None, path: Path
) -> MetaTensor | None:
    """``image`` ``(C, *S)`` through a bundle's own preprocessing, then its channels matched: the
    classifier's input ``(channels, *s)`` with the transforms recorded (``applied_operations``), for
    ``preprocessing.invert``. Checked: the classifier's dimensions, and that the transforms can be
    undone on its evidence (before any optimisation). ``None``, with a warning, for a volume (or
    cine) and a 2D classifier: a 2D preprocessing does not take it, its slices get Med-CAM's own.

    Raises:
        InputError: naming ``path``, where any of this fails.
    """
    if spatial_dims == 2 and image.ndim == 4:
        logger.warning("%s: a volume for a 2D classifier: its slices are prepared by Med-CAM's own preparation "
                       "(intensities stretched to [0, 1], resized), not by %s, which takes 2D images.", path, preprocessing)
        return None
    if spatial_dims == 3 and image.meta.get(NOT_A_VOLUME):
        raise InputError(path, f"{image.meta[NOT_A_VOLUME]}, not a volume: a 3D classifier cannot explain it.")
    try:
        prepared = preprocessing(image)
    except Exception as err:
        raise InputError(path, f"the bundle's preprocessing failed on it ({type(err).__name__}: {err}).") from err
    dims = prepared.ndim - 1
    if dims != spatial_dims:
        raise InputError(path, f"the bundle's preprocessing gives a {dims}D image of shape {tuple(prepared.shape[1:])}; the "
                               f"classifier takes {spatial_dims}D inputs.")
    try:  # undone once on an empty map now, not after the optimisation
        back = preprocessing.invert(torch.zeros(1, *prepared.shape[1:]), prepared, soft=True)
    except Exception as err:
        back = err
    if not isinstance(back, torch.Tensor) or tuple(back.shape[1:]) != tuple(image.shape[1:]):
        found = f"{type(back).__name__}: {back}" if isinstance(back, Exception) else f"shape {tuple(back.shape[1:])}"
        raise InputError(path, f"{preprocessing} cannot be undone on its evidence ({found}; the source has {tuple(image.shape[1:])}).")
    data = _fit_channels(prepared.as_tensor().float(), channels, path, image.meta.get(INPUT_KIND))
    return MetaTensor(data, meta=dict(prepared.meta), applied_operations=list(prepared.applied_operations))


def _sides(size: Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """The classifier's input size per axis: ``size`` as given, or its one side for every axis."""
    return tuple(size) if len(size) == spatial_dims else tuple(size) * spatial_dims


def check_classifier(
    explainer: MedCAM, spatial_dims: int, channels: int | None, size: Sequence[int] | None, class_idx: int | None,
    device: torch.device, options: str = "--spatial-dims, --size and --channels", class_names: Sequence[int] = (),
) -> None:
    """One forward pass of zeros ``(2, channels, *size)`` before any input is read: a classifier that
    does not take ``spatial_dims``-D inputs of that shape, or a ``class_idx`` (or a named class, the
    indices ``class_names``) beyond its classes, is a ``ValueError`` here (naming ``options`` to check)
    rather than a failure of every batch. Skipped where the size or the channels are unknown
    (``size=None`` keeps each input's own size)."""
    if size is None or channels is None:
        return
    shape = (1, channels, *_sides((size,) if isinstance(size, int) else size, spatial_dims))
    try:  # a batch of two: a classifier may squeeze a batch of one away
        with explainer.classifier.frozen(), torch.no_grad():
            logits = explainer.classifier.logits(torch.zeros((2, *shape[1:]), device=device))
    except Exception as err:
        raise ValueError(f"the classifier failed on {spatial_dims}D inputs of shape {shape} ({type(err).__name__}: {err}); "
                         f"check {options}.") from err
    if class_idx is not None:
        class_indices(class_idx, 1, device, "--class-idx", classes=logits.shape[1])
    classes = max(logits.shape[1], 2)  # a single logit decides between classes 0 and 1
    if class_names and not 0 <= min(class_names) <= max(class_names) < classes:
        raise ValueError(f"class names are given for classes {sorted(class_names)}, but the classifier has {classes} "
                         f"(0-{classes - 1}); check --class-names, or a bundle's metadata.json channel_def.")


def _outcome(report: ExplainReport) -> dict:
    """The run record's outcome: counts, each failed input's problem and the files this run wrote
    (anything else in the folder is from an earlier run: an interrupted one leaves some)."""
    files = sorted(path.name for paths in report.written.values() for path in paths)
    return dict(explained=len(report.written), failed=len(report.failures), failures=dict(report.failures), files=files)


@contextmanager
def _only_run(output: Path, names: Sequence[str]) -> Iterator[None]:
    """Hold ``output/.medcam.lock`` while a run writes there (:func:`~monai_medcam.writers.only_writer`):
    a second run into the folder is refused, not left to overwrite this one's summary and record.
    Holding it, the temporaries an earlier run killed while writing left of this run's files are removed
    (without a lock, left: a run cannot know whether another writes them)."""
    try:
        with only_writer(output / ".medcam.lock") as held:
            ours = {"summary.csv", RUN_RECORD} | {name + suffix for name in names for suffix in EVIDENCE_SUFFIXES.values()}
            left = remove_temporaries(output, ours) if held else []  # unlocked, another run may be writing them
            if left:
                logger.info("removed %d temporary file(s) an earlier run left in %s", len(left), output)
            yield
    except OutputsLocked as err:  # only the lock's own refusal: the block raises no such error
        raise ValueError(f"output folder {output}: another run is writing there (it holds {err.lock}); wait for it "
                         "to finish, or give another output folder.") from err


def _writable_folder(folder: Path) -> Path:
    """``folder``, created if need be, after checking that files can be written in it (before any work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ".medcam-write-check") as probe:
            probe.write_bytes(b"")
        (folder / ".medcam-write-check").unlink(missing_ok=True)  # another run's check may have taken it
    except OSError as err:
        raise ValueError(f"output folder {folder}: cannot write there ({type(err).__name__}: {err.strerror or err}).") from err
    return folder


def back_to_source(masks: torch.Tensor, shape: Sequence[int], soft: bool) -> torch.Tensor:
    """``(N, 1, *s)`` -> ``(N, 1, *shape)``: (bi/tri)linear for soft masks; for binary ones nearest
    along axes that grow and, along axes that shrink (a source smaller than the classifier's input),
    a source pixel is evidence where any classifier pixel it covers is: nearest sampling would
    drop evidence thinner than the ratio (on a tiny image, all of it)."""
    shape = tuple(int(n) for n in shape)
    if tuple(masks.shape[2:]) == shape:
        return masks
    if soft:
        mode = "bilinear" if masks.ndim == 4 else "trilinear"
        return F.interpolate(masks.float(), size=shape, mode=mode, align_corners=False)
    grown = tuple(max(t, n) for t, n in zip(shape, masks.shape[2:]))
    masks = masks.float() if grown == tuple(masks.shape[2:]) else F.interpolate(masks.float(), size=grown, mode="nearest-exact")
    if grown == shape:
        return masks
    pool = F.adaptive_max_pool2d if masks.ndim == 4 else F.adaptive_max_pool3d
    return pool(masks, shape)


@dataclass
class _Pending:
    """An input whose pieces are being explained."""

    item: ImageInput
    name: str
    image: MetaTensor
    pieces: int
    sliced: bool  # a volume explained slice by slice by a 2D classifier (one piece per slice, even if just one)
    ornt: np.ndarray | None = None  # how the volume was reoriented for the classifier (see reorient)
    prepared: MetaTensor | None = None  # the bundle's preprocessing's output, its transforms recorded (to invert)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    softs: dict[int, torch.Tensor] = field(default_factory=dict)
    heat: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: dict[int, dict[str, object]] = field(default_factory=dict)


def _assemble(parts: dict[int, torch.Tensor], pending: _Pending) -> torch.Tensor:
    """Per-piece maps ``(1, *s)`` at the source's size (reoriented as for the classifier) -> ``(1, *S)``
    for the whole input, in the source's geometry."""
    ordered = [parts[k] for k in range(pending.pieces)]
    whole = torch.stack(ordered, dim=-1) if pending.sliced else ordered[0]
    return reorient(whole, pending.ornt, inverse=True).contiguous()


def write_rows_csv(path: Path, rows: Sequence[dict[str, object]]) -> Path:
    """The summary table as CSV, written atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROW_FIELDS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def expected_images(item: ImageInput, spatial_dims: int) -> int:
    """How many images ``item`` gives the classifier, from its header alone (for the progress bar):
    a volume's slices for a 2D classifier (a 2D bundle's preprocessing takes slices too), else one."""
    if spatial_dims == 3:
        return 1
    try:
        if item.kind == "dicom_series":
            return max(len(item.files), 1)
        if item.kind == "nifti":
            import nibabel

            shape = nibabel.load(str(item.path)).shape
            return int(shape[2]) if len(shape) >= 3 else 1
        if item.kind == "dicom_frames":
            import pydicom

            return max(int(pydicom.dcmread(item.path, stop_before_pixels=True).get("NumberOfFrames") or 1), 1)
    except Exception:  # noqa: BLE001 - an unreadable header: loading says what is wrong
        return 1
    return 1


def explain_inputs(
    classifier: torch.nn.Module,
    inputs: Sequence[ImageInput],
    output: str | Path,
    formats: str | Sequence[str] = FORMATS,
    spatial_dims: int = 2,
    channels: int | None = None,
    size: Sequence[int] | None = None,
    class_idx: int | None = None,
    target_layers: str | Sequence[str] = "auto",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    fractional: bool = False,
    gradcam_layer: str | None = None,
    progress: bool = True,
    class_names: str | Sequence[str] | dict | None = None,
    orientation: str | None = None,
    preprocessing: BundlePreprocessing | None = None,
    failures: Mapping[str, str] | None = None,
    provenance: Mapping[str, object] | None = None,
    **settings: object,
) -> ExplainReport:
    """Explain every input with ``classifier`` and write ``formats`` to ``output``.

    Args:
        classifier: the frozen classifier; moved to ``device``.
        inputs: from :func:`monai_medcam.io.find_inputs`.
        output: folder for ``<name>_evidence_seg.dcm``, ``<name>_evidence.nii.gz``,
            ``<name>_evidence.png`` (``<name>``: :func:`~monai_medcam.io.output_names`) and
            ``summary.csv``, rewritten (atomically) as each input is written: it lists this run's
            inputs only.
        formats: any of ``seg`` (DICOM inputs only), ``nifti``, ``png``.
        spatial_dims: the classifier's; a 2D classifier explains a volume slice by slice.
        channels: the classifier's input channels (images are converted); ``None`` keeps them.
        size: the classifier's input size (images are resized to it; masks are resized back).
        class_idx: the class to explain; the prediction when ``None``.
        target_layers: as for :class:`~monai_medcam.MedCAM`.
        batch_size: images optimised together (slices and inputs of the same shape share batches).
        device: where to run.
        fractional: write FRACTIONAL DICOM SEG of the soft mask instead of BINARY.
        gradcam_layer: add a Grad-CAM column of this layer to the PNG panels.
        progress: show a progress bar (inputs done, rate, ETA).
        class_names: the classes' names, in class order (``("no lesion", "lesion")``) or by index
            (a bundle's ``channel_def``): shown in the PNG panels and the SEG's descriptions.
        orientation: axis codes (``"RAS"``) volumes are reoriented to for the classifier, as in its
            training (MONAI's ``Orientationd``); the evidence is reoriented back, so the outputs keep
            the source's geometry. ``None`` gives the classifier volumes as read. 2D images are as read.
        preprocessing: a bundle's own preprocessing (:class:`~monai_medcam.preprocessing.BundlePreprocessing`)
            instead of Med-CAM's own (intensities to [0, 1], ``orientation``, resizing to ``size``):
            each input goes through its transforms as in the classifier's training (then channels are
            matched), and the evidence is inverted through them onto the source's voxels. ``size`` is
            then only checked against, and ``orientation`` is for the inputs a 2D preprocessing does
            not take: a volume (or cine) for a 2D classifier, whose slices get Med-CAM's own, with a warning.
        failures: inputs that failed before this call (``{label: problem}``, a file that could not be
            found or read), reported and counted with this run's.
        provenance: where given (``command``, ``classifier``: :func:`~monai_medcam.provenance.command_context`),
            ``run.json`` is written beside the outputs once the inputs are counted, and again when
            the run ends, interrupted or not (:mod:`monai_medcam.provenance`); an earlier run's is
            removed either way.
        settings: any :class:`~monai_medcam.MedCAMSettings` field (``steps``, ``seed``, ...).
    """
    formats = output_formats(formats)
    orientation = check_orientation(orientation)
    device = torch.device(device)
    classifier = classifier.to(device).eval()
    explainer = MedCAM(classifier, target_layers, **settings)
    if gradcam_layer is not None and "png" in formats:
        grad_cam_layer(classifier, gradcam_layer)  # a bad layer stops here, before any work
    class_names = class_names_map(class_names)
    check_classifier(explainer, spatial_dims, channels, size, class_idx, device, class_names=list(class_names))
    output = _writable_folder(Path(output))
    names = output_names(list(inputs))
    with _only_run(output, names):  # one run at a time in a folder; an earlier run's temporaries removed
        summary_csv = write_rows_csv(output / "summary.csv", [])  # an earlier run's summary would describe other masks
        record_path = output / RUN_RECORD
        remove_run_record(record_path)  # and so would its record
        report = ExplainReport(failures=dict(failures or {}))
        record = None if provenance is None else run_record(explainer, spatial_dims, device, settings, **provenance)
        # counts images and slices, from the headers; corrected as each input is loaded
        expected = {id(item): expected_images(item, spatial_dims) for item in inputs}
        bar = tqdm(total=sum(expected.values()), unit="image", desc="Med-CAM", disable=not progress)

        queue: list[tuple[_Pending, int, torch.Tensor]] = []
        fresh: set[Path] = set()  # files this run wrote for inputs that failed in part

        def fail(pending_or_item, err: Exception) -> None:
            item = pending_or_item.item if isinstance(pending_or_item, _Pending) else pending_or_item
            message = err.problem if isinstance(err, InputError) else str(err) if isinstance(err, OutputError) else f"{type(err).__name__}: {err}"
            if isinstance(err, InputError) and err.path != item.path and err.path.is_file():  # one file of a series: name it
                message = f"{err.path.relative_to(item.path) if err.path.is_relative_to(item.path) else err.path}: {message}"
            report.failures[item.label] = message
            logger.error("%s: %s", item.label, message)

        def finish(pending: _Pending) -> None:
            image = pending.image
            mask = MetaTensor(_assemble(pending.masks, pending), meta=dict(image.meta))
            soft = _assemble(pending.softs, pending)
            # Grad-CAM only when every piece has it (it may have failed on one of the batches)
            heat = {"Grad-CAM": _assemble(pending.heat, pending)} if len(pending.heat) == pending.pieces else None
            rows = sorted(pending.rows.values(), key=lambda r: r["slice"] or 0)  # in the source's slice order
            label = evidence_class(rows)
            try:
                report.written[pending.item.label] = write_outputs(
                    image, mask, output, pending.name, formats, soft, label, heat, pending.name, fractional, panel_slices(rows), rows,
                    class_names,
                )
            except OutputError as err:  # some formats written: their rows stay in the summary
                fail(pending, err)
                fresh.update(err.written)
                if not err.written:
                    return
            except Exception as err:  # a writer refusing one input must not stop the others
                fail(pending, err)
                return
            report.rows.extend(rows)
            write_rows_csv(summary_csv, report.rows)  # after each input: an interrupted run's summary lists what it wrote

        def run_batch() -> None:
            if not queue:
                return
            batch = torch.stack([piece for _, _, piece in queue]).to(device)
            owners = {id(p): p for p, _, _ in queue}
            try:
                # the log names inputs, and a volume's slices by the source's numbers
                names = [f"{p.name} slice {source_slice(k, p.pieces, p.ornt)}" if p.sliced else p.name for p, k, _ in queue]
                result = explainer.explain(batch, class_idx, names=names)
            except Exception as err:
                for pending in owners.values():
                    fail(pending, err)
                bar.update(len(queue))
                queue.clear()
                return
            heat = None
            if gradcam_layer is not None and "png" in formats:
                try:
                    heat = grad_cam(classifier, batch, gradcam_layer, result.label)
                except Exception as err:  # the evidence is written all the same, its panel without Grad-CAM
                    which = ", ".join(sorted({Path(p.item.path).name for p in owners.values()}))
                    logger.warning("Grad-CAM at %r failed (%s: %s); panels of %s without it.", gradcam_layer, type(err).__name__, err, which)
            summary = result.summary()
            for j, (pending, k, _) in enumerate(queue):
                if pending.item.label in report.failures:
                    continue
                try:  # one input's problem here must not stop the others
                    shape = oriented_shape(pending.image.shape[1:], pending.ornt)
                    shape = shape[:-1] if pending.sliced else shape

                    def back(maps: torch.Tensor, soft: bool, pending: _Pending = pending, shape: tuple = shape) -> torch.Tensor:
                        """``(1, 1, *s)`` on the classifier's input -> ``(1, *shape)`` on the source's voxels."""
                        if pending.prepared is None:
                            return back_to_source(maps, shape, soft)[0]
                        return preprocessing.invert(maps[0], pending.prepared, soft)  # its shape checked by bundle_prepared

                    pending.masks[k] = back(result.mask[j : j + 1].as_tensor().cpu(), soft=False)
                    pending.softs[k] = back(result.soft_mask[j : j + 1].cpu(), soft=True)
                    if heat is not None:
                        pending.heat[k] = back(heat[j : j + 1].cpu(), soft=True)
                    number = source_slice(k, pending.pieces, pending.ornt) if pending.sliced else ""
                    row = {"input": pending.item.label, "slice": number, "evidence": pending.name}
                    row.update({name: summary[j][name] for name in ROW_FIELDS if name in summary[j]})
                    pending.rows[k] = row
                    if len(pending.masks) == pending.pieces:
                        finish(pending)
                except Exception as err:
                    fail(pending, err)
            bar.update(len(queue))
            queue.clear()

        named = list(zip(inputs, names))
        if record is not None:
            write_run_record(record_path, record)
        try:
            for item, name in named:
                if set(formats) == {"seg"} and not item.kind.startswith("dicom"):  # before any work for it
                    fail(item, InputError(item.path, SEG_NEEDS_DICOM))
                    bar.update(expected[id(item)])
                    continue
                try:
                    image = load_image(item)
                    no_seg = seg_problem(image.meta) if set(formats) == {"seg"} else None
                    if no_seg:  # a cine: no SEG, so no work for it
                        raise InputError(item.path, no_seg)
                    prepared = None if preprocessing is None else bundle_prepared(preprocessing, image, spatial_dims, channels, item.path)
                    if prepared is None:
                        pieces = to_classifier_space(image, spatial_dims, channels, size, item.path, orientation)
                    else:
                        pieces = [prepared.as_tensor()]
                except Exception as err:
                    fail(item, err)
                    bar.update(expected[id(item)])
                    continue
                if len(pieces) != expected[id(item)]:
                    bar.total += len(pieces) - expected[id(item)]
                    bar.refresh()
                pending = _Pending(item, name, image, len(pieces), sliced=prepared is None and spatial_dims == 2 and image.ndim == 4,
                                   ornt=reorientation(image, orientation) if prepared is None else None, prepared=prepared)
                for k, piece in enumerate(pieces):
                    if queue and (queue[0][2].shape != piece.shape or len(queue) >= batch_size):
                        run_batch()
                    queue.append((pending, k, piece))
            run_batch()
        except BaseException as err:  # KeyboardInterrupt too: the record says the run did not finish
            if record is not None:
                write_run_record(record_path, record, "interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
                                 **_outcome(report), error=f"{type(err).__name__}: {err}")
            raise
        finally:
            bar.close()
        for item, name in named:  # a failed input's files from an earlier run must not pass for this run's
            earlier = [path.name for path in (output / (name + EVIDENCE_SUFFIXES[f]) for f in FORMATS) if path.is_file() and path not in fresh]
            if item.label in report.failures and earlier:
                report.failures[item.label] += f" (left from an earlier run, not this one's: {', '.join(earlier)})"
        if record is not None:
            write_run_record(record_path, record, "finished", **_outcome(report))
        return report
