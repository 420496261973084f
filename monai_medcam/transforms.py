"""MONAI transforms around Med-CAM, in the order a pipeline (or a bundle) uses them.

- ``LoadInput`` / ``LoadInputd``: a path (image file, or folder of one DICOM series) -> ``(C, *S)``.
- ``ToClassifierSpace`` / ``ToClassifierSpaced``: ``(C, *S)`` -> what the classifier takes
  (intensities in [0, 1], a volume reoriented to its axis codes if given, channels, size; a
  volume's slices on the last axis for a 2D classifier).
- ``MedCAMExplain`` / ``MedCAMExplaind``: ``(C, *spatial)`` -> binary evidence ``(1, *spatial)``,
  a MetaTensor with the image's metadata and Med-CAM's diagnostics under ``meta["medcam"]``
  (label, probabilities, area, verified, steps). In an evaluator, ``MedCAMInferer`` does this step.
- ``SaveEvidenced``: evidence back in the source geometry (resized and reoriented back), written
  as DICOM SEG / NIfTI / PNG with a summary CSV. (Evidence on an image a bundle's own
  preprocessing prepared, ``ToClassifierSpace(preprocessing=...)``, goes back through that
  preprocessing's ``invert``, as ``ToSourceGeometryd`` of the MONAI Label task does; not here.)
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from nibabel.orientations import inv_ornt_aff

from monai_medcam.classifiers import LayerSpec, TargetLayer, index_tensor
from monai_medcam.engine import MIN_SPATIAL_SIZE, MedCAM, MedCAMResult
from monai_medcam.io import INPUT_LABEL, INPUT_NAME, find_input, load_image
from monai_medcam.orientation import check_orientation, oriented_shape, reorient, reorientation, source_slice
from monai_medcam.pipeline import ROW_FIELDS, back_to_source, bundle_prepared, to_classifier_space, write_rows_csv
from monai_medcam.preprocessing import BundlePreprocessing
from monai_medcam.visualize import class_names_map
from monai_medcam.writers import FORMATS, OutputError, evidence_class, output_formats, panel_slices, write_outputs

__all__ = [
    "LoadInput",
    "LoadInputd",
    "ToClassifierSpace",
    "ToClassifierSpaced",
    "MedCAMExplain",
    "MedCAMExplaind",
    "SaveEvidenced",
    "DIAGNOSTICS_KEY",
    "ORIENTATION_KEY",
    "PREPROCESSED_KEY",
    "evidence_from_result",
    "evidence_in_source",
    "diagnostic_columns",
]

logger = logging.getLogger(__name__)

DIAGNOSTICS_KEY = "medcam"
ORIENTATION_KEY = "medcam_orientation"  # meta of a volume ToClassifierSpace reoriented: the axis codes
PREPROCESSED_KEY = "medcam_preprocessed"  # meta of an image ToClassifierSpace gave a bundle's preprocessing: True
OUTPUTS = ("mask", "soft_mask")


def evidence_from_result(result: MedCAMResult, index: int, like: torch.Tensor, output: str = "mask") -> MetaTensor:
    """Image ``index`` of ``result`` as ``(1, *spatial)`` on ``like``'s device, with ``like``'s metadata and the diagnostics."""
    values = getattr(result, output)[index]
    values = values.as_tensor() if isinstance(values, MetaTensor) else values
    meta = dict(like.meta) if isinstance(like, MetaTensor) else {}
    meta[DIAGNOSTICS_KEY] = result.summary()[index]
    return MetaTensor(values.to(like.device), meta=meta)


def diagnostic_columns(evidence: torch.Tensor) -> dict[str, list]:
    """The diagnostics an inferer put in ``evidence.meta["medcam"]``, one list per name (one value per
    image, or per slice in the classifier's order); empty for a plain tensor."""
    meta = evidence.meta if isinstance(evidence, MetaTensor) else {}
    return {name: torch.as_tensor(column).flatten().tolist() for name, column in meta.get(DIAGNOSTICS_KEY, {}).items()}


def evidence_in_source(evidence: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, dict[str, list]]:
    """Evidence ``(1, *s)`` in classifier space (as an inferer gives it) -> ``(1, *S)`` float on the
    source's voxels (:func:`~monai_medcam.pipeline.back_to_source`, on CPU; reoriented back where
    :class:`ToClassifierSpace` reoriented the volume), and its diagnostics as one list per name (one
    value per image, or per slice of the source for a 2D classifier over a volume)."""
    values = evidence.as_tensor() if isinstance(evidence, MetaTensor) else torch.as_tensor(evidence)
    meta = evidence.meta if isinstance(evidence, MetaTensor) else {}
    if bool(torch.as_tensor(meta.get(PREPROCESSED_KEY, False)).any()):  # collated: one flag per image
        raise ValueError("the evidence is on an image a bundle's preprocessing prepared (ToClassifierSpace(preprocessing=...)): "
                         "put it back with that preprocessing's invert (or MONAI's Invertd), not by resizing.")
    axcodes = meta.get(ORIENTATION_KEY)
    if isinstance(axcodes, (list, tuple)) and len(set(axcodes)) == 1:  # still collated: one per image of the batch
        axcodes = axcodes[0]
    ornt = reorientation(source, check_orientation(axcodes, f"meta[{ORIENTATION_KEY!r}]"))
    mask = back_to_source(values.detach().float().cpu()[None], oriented_shape(source.shape[1:], ornt), soft=False)[0]
    columns = diagnostic_columns(evidence)
    count = len(next(iter(columns.values()), []))
    if count > 1:  # one value per classifier slice: in the source's slice order
        order = sorted(range(count), key=lambda k: source_slice(k, count, ornt))
        columns = {name: [column[k] for k in order] for name, column in columns.items()}
    return reorient(mask, ornt, inverse=True).contiguous(), columns


def _check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
    return output


def numbers_as_tensor(data: object) -> object:
    """A numpy array of numbers as a tensor (a copy in native byte order, whatever its strides), as
    MONAI's transforms take either; anything else as given."""
    if isinstance(data, np.ndarray) and data.dtype.kind in "biuf":
        return torch.from_numpy(np.array(data, dtype=data.dtype.newbyteorder("="), order="C"))
    return data


def _image(img, what: str) -> torch.Tensor:
    """``img`` ``(C, H, W[, D])`` as a tensor (:func:`numbers_as_tensor`); anything else is a ``ValueError``."""
    img = numbers_as_tensor(img)
    if isinstance(img, torch.Tensor) and img.ndim in (3, 4):
        return img
    if isinstance(img, torch.Tensor):
        got = tuple(img.shape)
    else:  # an array left unconverted holds no numbers (object, strings, complex)
        got = f"an array of {img.dtype}" if isinstance(img, np.ndarray) else type(img).__name__
    raise ValueError(f"{what} takes a channel-first image (C, H, W[, D]); got {got}.")


class MedCAMExplain(Transform):
    """Med-CAM evidence for one channel-first image.

    Args:
        nn_module: the frozen classifier ``(B, C, *spatial) -> (B, K)``; the image is moved to its device.
        target_layers: as for :class:`~monai_medcam.MedCAM`.
        class_idx: class to explain; the prediction when ``None``.
        output: ``"mask"`` (binary evidence) or ``"soft_mask"`` (the mask network's sigmoid).
        settings: any :class:`~monai_medcam.MedCAMSettings` field (``steps``, ``seed``, ...).

    Example::

        explain = MedCAMExplain(classifier, steps=200)
        evidence = explain(image)          # (1, H, W) MetaTensor; evidence.meta["medcam"]["verified"]
    """

    def __init__(
        self,
        nn_module: torch.nn.Module,
        target_layers: str | Sequence[LayerSpec | TargetLayer] = "auto",
        class_idx: int | None = None,
        output: str = "mask",
        **settings: object,
    ) -> None:
        self.explainer = MedCAM(nn_module, target_layers, **settings)
        self.class_idx = class_idx
        self.output = _check_output(output)

    def _device(self, img: torch.Tensor) -> torch.device:
        params = list(self.explainer.nn_module.parameters())
        return params[0].device if params else img.device

    def __call__(self, img: NdarrayOrTensor, class_idx: int | None = None) -> MetaTensor:
        """``img`` ``(C, *spatial)`` (a tensor or a numpy array) -> evidence ``(1, *spatial)``."""
        img = _image(img, "MedCAMExplain")
        if img.ndim == 4 and min(img.shape[1:]) < MIN_SPATIAL_SIZE:
            raise ValueError(f"MedCAMExplain takes one channel-first image (C, H, W[, D]); {tuple(img.shape)} is a volume "
                             f"with a side under {MIN_SPATIAL_SIZE} or a batch of 2D images (MedCAM and MedCAMInferer take batches).")
        x = img.as_tensor() if isinstance(img, MetaTensor) else img
        result = self.explainer.explain(x[None].to(self._device(img)), self.class_idx if class_idx is None else class_idx)
        return evidence_from_result(result, 0, img, self.output)


class MedCAMExplaind(MapTransform):
    """Dictionary twin of :class:`MedCAMExplain`: adds ``data[output_key]`` for each of ``keys``.

    Args:
        keys: the image keys to explain.
        nn_module, target_layers, class_idx, output, settings: as for :class:`MedCAMExplain`.
        output_keys: where to put each evidence mask; ``"{key}_evidence"`` by default.
        class_idx_key: take the class to explain from ``data[class_idx_key]`` (e.g. the ground-truth label).
        allow_missing_keys: skip absent keys instead of raising; an absent ``class_idx_key`` then
            leaves ``class_idx`` (the prediction when ``None``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        nn_module: torch.nn.Module,
        target_layers: str | Sequence[LayerSpec | TargetLayer] = "auto",
        class_idx: int | None = None,
        output: str = "mask",
        output_keys: KeysCollection | None = None,
        class_idx_key: Hashable | None = None,
        allow_missing_keys: bool = False,
        **settings: object,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.explain = MedCAMExplain(nn_module, target_layers, class_idx, output, **settings)
        names = [f"{key}_evidence" for key in self.keys] if output_keys is None else list(output_keys)
        if isinstance(output_keys, str):
            names = [output_keys]
        if len(names) != len(self.keys):
            raise ValueError(f"output_keys has {len(names)} names for {len(self.keys)} keys.")
        self.output_keys = names
        self.class_idx_key = class_idx_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        todo = list(self.key_iterator(d, self.output_keys))
        if not todo:  # every image key missing (allowed): nothing to explain, no label needed
            return d
        class_idx, source = None, ""
        if self.class_idx_key is not None and (self.class_idx_key in d or not self.allow_missing_keys):
            if self.class_idx_key not in d:
                raise KeyError(f"class_idx_key {self.class_idx_key!r} is not in the data (keys: {list(d)}).")
            label = index_tensor(d[self.class_idx_key], f"data[{self.class_idx_key!r}]")
            if label.numel() != 1:
                raise ValueError(f"{self.class_idx_key!r} holds {label.numel()} values {label.tolist()[:8]}; give the class "
                                 "index (one-hot or probabilities: apply AsDiscrete(argmax=True) first).")
            class_idx, source = label.item(), f" (the class from data[{self.class_idx_key!r}])"  # not whole: refused by MedCAM
        for key, out_key in todo:
            try:
                d[out_key] = self.explain(d[key], class_idx)
            except ValueError as err:  # the label's key named where the class is at fault
                raise ValueError(f"data[{key!r}]: {err}" + (source if str(err).startswith("class_idx") else "")) from err
        return d


class LoadInput(Transform):
    """A path -> the image as a float32 channel-first MetaTensor ``(C, *S)`` with its affine.

    The path is an image file (DICOM, NIfTI, PNG/JPEG/TIFF), a folder holding one DICOM series or
    the list of one series' files (:func:`~monai_medcam.io.input_datalist` gives those);
    see :func:`monai_medcam.io.load_image` for the readers and checks. Unreadable input raises
    :class:`~monai_medcam.io.InputError` naming the path.
    """

    def __call__(self, path: str | Path) -> MetaTensor:
        return load_image(find_input(path))


class LoadInputd(MapTransform):
    """Dictionary twin of :class:`LoadInput`: replaces each path under ``keys`` by its image. An
    output name beside it (``data[f"{key}_{name_postfix}"]``, as :func:`~monai_medcam.io.input_datalist`
    gives) goes to the image's metadata, for :class:`SaveEvidenced` to name its files."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, name_postfix: str = "name") -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadInput()
        self.name_postfix = name_postfix

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
            name = d.get(f"{key}_{self.name_postfix}")
            if isinstance(name, str) and name:
                d[key].meta[INPUT_NAME] = name
        return d


def _resized_affine(affine: torch.Tensor, old: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """The affine of an image resized from ``old`` to ``new`` voxels (pixel centres, ``align_corners=False``)."""
    rank = affine.shape[-1] - 1
    scale = torch.eye(rank + 1, dtype=affine.dtype)
    for i, (a, b) in enumerate(zip(old, new)):
        if i < rank and a != b:
            factor = a / b
            scale[i, i] = factor
            scale[i, rank] = (factor - 1) / 2
    return affine @ scale


class ToClassifierSpace(Transform):
    """An image as loaded ``(C, *S)`` -> the classifier's input.

    Intensities are stretched to [0, 1] (MONOCHROME1 inverted), channels matched, and the image
    resized to ``size``: ``(C', *size)``; for a 2D classifier and a volume, the slices resized and
    stacked on the last axis ``(C', *size, D)`` (``MedCAMInferer(spatial_dims=2)`` explains them
    one by one). :class:`SaveEvidenced` brings the evidence back to ``(1, *S)``.

    Args:
        spatial_dims: the classifier's, 2 or 3.
        channels: the classifier's input channels; ``None`` keeps the image's.
        size: the classifier's input size (an int for all sides); ``None`` keeps the image's.
        orientation: axis codes (``"RAS"``) a volume is reoriented to first, as the classifier saw
            volumes in training (MONAI's ``Orientationd``); recorded in ``meta["medcam_orientation"]``
            for :class:`SaveEvidenced` to reorient the evidence back. ``None``: as read.
        preprocessing: a bundle's own (:class:`~monai_medcam.preprocessing.BundlePreprocessing`)
            instead of all the above, for every image it takes (not a volume for a 2D classifier):
            the output carries its recorded transforms and ``meta["medcam_preprocessed"]``, and
            ``preprocessing.invert`` puts evidence back (channels are still matched).
    """

    def __init__(
        self, spatial_dims: int, channels: int | None = None, size: int | Sequence[int] | None = None, orientation: str | None = None,
        preprocessing: BundlePreprocessing | None = None,
    ) -> None:
        self.orientation = check_orientation(orientation)
        self.preprocessing = preprocessing
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.size = None if size is None else ([size] * spatial_dims if isinstance(size, int) else list(size))
        if self.size is not None and (len(self.size) != spatial_dims or any(int(n) < 1 for n in self.size)):
            raise ValueError(f"size {size!r} must be {spatial_dims} positive side length(s) (or one int for all).")
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be positive, got {channels!r}.")

    def __call__(self, img: NdarrayOrTensor) -> MetaTensor:
        """``img`` ``(C, *spatial)`` (a tensor or a numpy array) -> the classifier's input ``(channels, *size)``,
        a volume's slices stacked on the last axis for a 2D classifier."""
        img = _image(img, "ToClassifierSpace")
        path = Path(str(img.meta.get("filename_or_obj", "image"))) if isinstance(img, MetaTensor) else Path("image")
        if self.orientation is not None and img.ndim == 4 and not isinstance(img, MetaTensor):
            raise ValueError(f"ToClassifierSpace(orientation={self.orientation!r}) needs the volume's affine: give a MetaTensor "
                             "(as LoadInputd or MONAI's LoadImaged give), not a plain tensor or array.")
        if self.preprocessing is not None:
            source = img if isinstance(img, MetaTensor) else MetaTensor(img)  # an array: identity affine
            prepared = bundle_prepared(self.preprocessing, source, self.spatial_dims, self.channels, path)
            if prepared is not None:  # else a volume for a 2D classifier: Med-CAM's own, below
                prepared.meta[PREPROCESSED_KEY] = True  # evidence_in_source refuses it: preprocessing.invert puts it back
                return prepared
        pieces = to_classifier_space(img, self.spatial_dims, self.channels, self.size, path, self.orientation)
        out = pieces[0] if img.ndim - 1 == self.spatial_dims else torch.stack(pieces, dim=-1)
        if not isinstance(img, MetaTensor):
            return MetaTensor(out)
        meta = dict(img.meta)
        ornt = reorientation(img, self.orientation)
        affine = img.affine
        if ornt is not None:
            affine = affine @ torch.as_tensor(inv_ornt_aff(ornt, tuple(img.shape[1:])), dtype=affine.dtype)
        if self.orientation is not None:  # on every image, so a batch that collates several keeps it
            meta[ORIENTATION_KEY] = self.orientation
        meta["affine"] = _resized_affine(affine, oriented_shape(img.shape[1:], ornt), out.shape[1:])
        meta["spatial_shape"] = list(out.shape[1:])
        return MetaTensor(out, meta=meta)


class ToClassifierSpaced(MapTransform):
    """Dictionary twin of :class:`ToClassifierSpace`; the image as loaded is kept under
    ``"{key}_source"`` for :class:`SaveEvidenced`."""

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int,
        channels: int | None = None,
        size: int | Sequence[int] | None = None,
        source_postfix: str = "source",
        allow_missing_keys: bool = False,
        orientation: str | None = None,
        preprocessing: BundlePreprocessing | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = ToClassifierSpace(spatial_dims, channels, size, orientation, preprocessing)
        self.source_postfix = source_postfix

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_{self.source_postfix}"] = d[key]
            d[key] = self.converter(d[key])
        return d


class SaveEvidenced(MapTransform):
    """Write each evidence mask under ``keys`` for its source image and add a row to a summary CSV.

    The mask ``(1, *s)`` (classifier space, as the inferer gives it) is resized (nearest) and
    reoriented (where :class:`ToClassifierSpaced` reoriented the volume) back to
    the source image ``(C, *S)`` kept by :class:`ToClassifierSpaced`, then written with
    :func:`monai_medcam.writers.write_outputs` as ``<name>_evidence_seg.dcm`` (DICOM sources),
    ``<name>_evidence.nii.gz`` and ``<name>_evidence.png``. The summary (one row per image, or per
    slice for a 2D classifier over a volume) is rewritten atomically after each image as
    ``summary.csv``, or ``summary_rank<r>.csv`` per process under ``torch.distributed``. A format
    that cannot be written for an image (a NIfTI for a series with uneven slice gaps, a SEG on a
    source without Study Instance UID) is logged as an error and the run goes on; ``*_files``
    lists what was written.

    Args:
        keys: the evidence keys (``"pred"`` in an evaluator's postprocessing).
        source_keys: the source image for each key.
        output_dir: where the files go (created).
        formats: any of ``seg``, ``nifti``, ``png``: a sequence, or one string (``"png"``, ``"seg,nifti"``).
        allow_missing_keys: skip absent keys instead of raising.
        class_names: the classes' names, in class order or by index (a bundle's ``channel_def``), for
            the PNG panels and the SEG.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        source_keys: KeysCollection = "image_source",
        output_dir: str | Path = "medcam_output",
        formats: str | Sequence[str] = FORMATS,
        allow_missing_keys: bool = False,
        class_names: str | Sequence[str] | Mapping | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.class_names = class_names_map(class_names)
        self.source_keys = [source_keys] if isinstance(source_keys, str) else list(source_keys)
        if len(self.source_keys) != len(self.keys):
            raise ValueError(f"source_keys has {len(self.source_keys)} names for {len(self.keys)} keys.")
        self.output_dir = Path(output_dir)
        self.formats = output_formats(formats)
        self.rows: list[dict[str, object]] = []
        self.names: set[str] = set()

    @property
    def summary_path(self) -> Path:
        """``summary.csv``, or ``summary_rank<r>.csv`` when ``torch.distributed`` is initialised."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return self.output_dir / f"summary_rank{dist.get_rank()}.csv"
        return self.output_dir / "summary.csv"

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, object]:
        d = dict(data)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for key, source_key in self.key_iterator(d, self.source_keys):
            evidence, source = d[key], d[source_key]
            if not isinstance(source, MetaTensor):
                raise ValueError(f"{source_key!r} must be the loaded image as a MetaTensor (see ToClassifierSpaced).")
            mask, columns = evidence_in_source(evidence, source)
            count = len(next(iter(columns.values()), []))
            rows = []
            for k in range(count):
                row: dict[str, object] = {"input": str(source.meta.get(INPUT_LABEL, source.meta.get("filename_or_obj", ""))),
                                          "slice": k if count > 1 else ""}
                row.update({name: columns[name][k] for name in ROW_FIELDS if name in columns})
                rows.append(row)
            name = str(source.meta.get(INPUT_NAME, Path(str(source.meta.get("filename_or_obj", key))).name))
            base, k = name, 1
            while name in self.names:  # two inputs with one name (e.g. a/t1.nii.gz, b/t1.nii.gz) keep both outputs
                k += 1
                name = f"{base}_{k}"
            self.names.add(name)
            for row in rows:
                row["evidence"] = name
            try:
                written = write_outputs(
                    source.cpu(),
                    MetaTensor(mask, meta=dict(source.meta)),
                    self.output_dir,
                    name,
                    self.formats,
                    label=evidence_class(rows),
                    title=name,
                    display_slices=panel_slices(rows),
                    rows=rows,
                    class_names=self.class_names,
                )
            except OutputError as err:  # the formats that could be written were: keep them, and the run going
                logger.error("%s: %s", source.meta.get("filename_or_obj", name), err)
                written = err.written
            self.rows.extend(rows)
            write_rows_csv(self.summary_path, self.rows)
            d[f"{key}_files"] = [str(p) for p in written]
        return d
