"""MONAI Label: Med-CAM evidence on demand, returned as a segmentation label ``{"evidence": 1}``
(``2``, "evidence NOT verified", where an image's or a slice's evidence was not verified; see
:func:`~monai_medcam.visualize.evidence_labels`).

MONAI Label 0.8.5 needs ``pydicom<3`` and lives in its own environment (``make venv-monailabel``);
this module is imported there, by a MONAI Label app such as ``apps/medcam``.

Request flow (``POST /infer/medcam?image=<id>``)::

    image path (NIfTI file or DICOM series folder) -> LoadInputd -> ToClassifierSpaced
    -> MedCAMInferer (gradients re-enabled under MONAI Label's no_grad) -> evidence resized back to
    the source voxels, a uint8 MetaTensor with the source affine (a 2D image's as a one-slice volume
    ``(H, W, 1)``, whose affine the writer keeps) -> MONAI Label's writer (NIfTI)

Request parameters (the ``params`` form field, JSON): ``steps`` (int >= 1), ``class_idx`` (int, or
null or -1 for the prediction), ``seed`` (int); a name close to one of these is refused. The
response JSON holds the diagnostics (label, verified, area per image or slice).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd

from monai_medcam.inferer import MedCAMInferer
from monai_medcam.orientation import check_orientation
from monai_medcam.settings import MedCAMSettings
from monai_medcam.preprocessing import BundlePreprocessing
from monai_medcam.transforms import PREPROCESSED_KEY, LoadInputd, ToClassifierSpaced, diagnostic_columns, evidence_in_source
from monai_medcam.visualize import evidence_labels, verification_by_slice

try:
    from monailabel.interfaces.tasks.infer_v2 import InferType
    from monailabel.tasks.infer.basic_infer import BasicInferTask
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "monai_medcam.monailabel needs MONAI Label 0.8.5, which lives in its own virtual environment "
        "(it needs pydicom<3): run `make venv-monailabel` and use .venv-monailabel."
    ) from err

__all__ = ["MedCAMInferTask", "RequestError", "ToSourceGeometryd", "LABELS"]

PARAMETERS = {"steps": 300, "class_idx": None, "seed": 0}


class RequestError(ValueError):
    """A request the task cannot serve (bad parameters); the app answers it with HTTP 400."""


LABELS = {"evidence": 1, "evidence NOT verified": 2}


class ToSourceGeometryd:
    """``pred`` ``(1, *s)`` in classifier space -> ``(*S)`` uint8 on the source voxels (a 2D image's
    ``(H, W, 1)``: MONAI Label 0.8.5's writer keeps no 2D label's affine), a MetaTensor with the
    source image's affine (what MONAI Label's writer uses): 1 where the evidence was verified, 2 where
    it was not (a client shows the two labels by their names, :data:`LABELS`); the diagnostics go to
    ``data["result"]``. Where a bundle's ``preprocessing`` prepared the image (``data["image"]``,
    marked by :class:`~monai_medcam.transforms.ToClassifierSpaced`), the evidence is inverted through it."""

    def __init__(
        self, pred_key: str = "pred", source_key: str = "image_source", result_key: str = "result",
        preprocessing: BundlePreprocessing | None = None, image_key: str = "image",
    ) -> None:
        self.pred_key, self.source_key, self.result_key = pred_key, source_key, result_key
        self.preprocessing, self.image_key = preprocessing, image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pred, source = d[self.pred_key], d[self.source_key]
        prepared = d.get(self.image_key)
        if self.preprocessing is not None and isinstance(prepared, MetaTensor) and prepared.meta.get(PREPROCESSED_KEY):
            values = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
            mask = self.preprocessing.invert(values.detach().float().cpu(), prepared, soft=False)
            columns = diagnostic_columns(pred)
        else:
            mask, columns = evidence_in_source(pred, source)
        mask = mask[0]  # MONAI Label's writer takes spatial axes only
        flags = {name: columns[name] for name in ("verified", "vacuous", "area") if name in columns}
        rows = [dict(zip(flags, row)) for row in zip(*flags.values())]  # per slice, or one
        mask = evidence_labels(mask, verification_by_slice(rows, mask.shape[-1] if mask.ndim == 3 else 1))
        affine = source.affine.clone()
        if mask.ndim == 2:  # MONAI Label 0.8.5's writer drops a 2D label's affine: a one-slice volume keeps it
            mask, affine = mask[..., None], to_affine_nd(3, affine)
        d[self.pred_key] = MetaTensor(mask.to(torch.uint8), affine=affine)
        result = dict(d.get(self.result_key) or {})
        result["medcam"] = {name: columns[name] for name in ("label", "verified", "settled", "vacuous", "area", "prob_evidence", "steps") if name in columns}
        result["evidence_voxels"] = int((mask > 0).sum())
        d[self.result_key] = result
        return d


def _parameters(data: Mapping[Hashable, Any], defaults: Mapping[str, Any] = PARAMETERS) -> dict[str, Any]:
    """The Med-CAM parameters of a request, checked (``defaults`` for those it does not give). A name
    close to one of them ("stepz", "classidx", "class") is refused, naming the parameter meant: it
    would otherwise be passed over unseen (a request carries MONAI Label's own keys too, so other
    names are left alone). ``class_idx`` -1 (or empty) means the prediction, as ``None``."""
    for key in data:
        if not isinstance(key, str) or key in defaults:
            continue
        near = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.7)
        near = near or [name for name in defaults if len(key) >= 4 and name.startswith(key)]
        if near:
            raise RequestError(f"unknown parameter {key!r}: did you mean {near[0]!r}? (parameters: {', '.join(defaults)})")
    out = {}
    for name, default in defaults.items():
        value = data.get(name, default)
        if name == "class_idx" and value in (None, "", -1):
            out[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                value = int(str(value))
            except ValueError:
                raise RequestError(f"parameter {name!r} must be an integer, got {value!r}.") from None
        if name == "steps" and not 1 <= value <= 10_000:
            raise RequestError(f"parameter 'steps' must be between 1 and 10000, got {value}.")
        out[name] = value
    return out


class MedCAMInferTask(BasicInferTask):
    """Med-CAM for a frozen classifier as a MONAI Label segmentation task (label ``evidence`` = 1,
    ``evidence NOT verified`` = 2).

    Args:
        network: the frozen classifier, weights loaded (e.g. :func:`monai_medcam.loading.load_classifier`);
            MONAI Label's own checkpoint loading (a plain ``torch.load``) is not used.
        spatial_dims: the classifier's; a 2D classifier explains a volume slice by slice.
        channels: the classifier's input channels (images are converted); ``None`` keeps them.
        size: the classifier's input size (images resized to it, evidence resized back).
        orientation: axis codes (``"RAS"``) volumes are reoriented to for the classifier, as in its
            training; the label is reoriented back onto the image's voxels. ``None``: as read.
        preprocessing: a bundle's own (:meth:`monai_medcam.loading.LoadedClassifier.bundle_preprocessing`)
            instead of Med-CAM's own preparation, for every image it takes (a 2D bundle's does not
            take volumes: their slices get Med-CAM's own); the label is inverted through it.
        dimension: what MONAI Label clients are told (3 for volumes).
        batch_size: slices optimised together.
        description: shown by ``GET /info/``.
        settings: ``target_layers``, ``output`` and any :class:`~monai_medcam.MedCAMSettings` field,
            fixed for every request, checked here; ``steps`` and ``seed`` (and ``class_idx``) set
            this task's defaults, which a request's parameters override. ``skip_vacuous`` is true
            unless given (as in the bundle): a slice or volume whose label holds with no evidence at
            all (typically "no lesion") gets an empty label, not a mask that says nothing.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        spatial_dims: int = 2,
        channels: int | None = None,
        size: int | Sequence[int] | None = None,
        dimension: int = 3,
        batch_size: int = 32,
        description: str = "Med-CAM: the minimal evidence behind the classifier's decision, as a label",
        orientation: str | None = None,
        preprocessing: BundlePreprocessing | None = None,
        **settings: object,
    ) -> None:
        self.orientation = check_orientation(orientation)
        self.preprocessing = preprocessing
        settings = {"skip_vacuous": True, **settings}
        defaults = self._defaults(settings)
        super().__init__(
            path=None,
            network=network,
            type=InferType.SEGMENTATION,
            labels=dict(LABELS),
            dimension=dimension,
            description=description,
            config=dict(defaults),
        )
        self.classifier = network.eval()
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.size = size
        self.batch_size = batch_size
        self.settings = {k: v for k, v in settings.items() if k not in PARAMETERS}
        self.defaults = defaults

    @staticmethod
    def _defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
        """The request parameters' defaults, after checking ``settings`` (a misspelt one fails here,
        not at the first request)."""
        inferer_own = ("target_layers", "output", "class_idx")  # MedCAMInferer's arguments that are not settings
        MedCAMSettings.from_kwargs(**{k: v for k, v in settings.items() if k not in inferer_own})
        defaults = {name: settings.get(name, default) for name, default in PARAMETERS.items()}
        return _parameters(defaults)

    def is_valid(self) -> bool:
        return True

    def pre_transforms(self, data: Mapping[Hashable, Any] | None = None) -> Sequence[Callable]:
        if data is not None:
            _parameters(data, self.defaults)  # bad parameters fail before the image is read
        to_classifier = ToClassifierSpaced(keys="image", spatial_dims=self.spatial_dims, channels=self.channels, size=self.size,
                                           orientation=self.orientation, preprocessing=self.preprocessing)
        return [LoadInputd(keys="image"), to_classifier]

    def inferer(self, data: Mapping[Hashable, Any] | None = None) -> MedCAMInferer:
        params = _parameters(data or {}, self.defaults)
        return MedCAMInferer(
            class_idx=params["class_idx"], spatial_dims=self.spatial_dims, batch_size=self.batch_size,
            steps=params["steps"], seed=params["seed"], **self.settings,
        )

    def post_transforms(self, data: Mapping[Hashable, Any] | None = None) -> Sequence[Callable]:
        return [ToSourceGeometryd(preprocessing=self.preprocessing)]

    def _get_network(self, device: str, data: Any) -> torch.nn.Module:
        """The classifier given at construction, on ``device`` (one instance, no checkpoint reloads)."""
        return self.classifier.to(torch.device(device))

    def writer(self, data: Mapping[Hashable, Any], extension: str | None = None, dtype: str | None = None) -> tuple[Any, dict]:
        """NIfTI (``.nii.gz``, uint8) whatever the input's format: a DICOM series folder has no extension."""
        return super().writer(data, extension=extension or ".nii.gz", dtype=dtype or "uint8")
