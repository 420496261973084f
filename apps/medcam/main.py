"""MONAI Label app: Med-CAM evidence of a frozen classifier, on demand, as a label.

    .venv-monailabel/bin/monailabel start_server --app apps/medcam --studies <folder> \
        --host 127.0.0.1 --port 8000 [--conf classifier <spec>] [--conf weights <file>]

``classifier`` is what ``medcam explain --classifier`` takes (TorchScript file, MONAI bundle folder,
``python:module:factory`` with ``weights``); by default the repository's bundle
``bundles/medcam_explain`` (the grayscale demo classifier, 64 px, slice by slice). ``size``,
``spatial_dims`` and ``channels`` override what the classifier says about its input, and
``orientation`` (axis codes such as ``RAS``, or ``none``) how volumes are reoriented for it (by
default a bundle's ``Orientationd``, else as read).

The studies folder may hold NIfTI files and DICOM series, one series per sub-folder (its name is
the image id). See README.md in this folder.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pydicom
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp

import monai_medcam
from monai_medcam.io import InputError
from monai_medcam.loading import load_classifier
from monai_medcam.monailabel import LABELS, MedCAMInferTask, RequestError

logger = logging.getLogger(__name__)

DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[2] / "bundles" / "medcam_explain"


class SeriesDatastore(LocalDatastore):
    """MONAI Label's local datastore, plus each sub-folder holding DICOM files as one image (id: the folder name)."""

    def _list_files(self, path, patterns):
        found = super()._list_files(path, patterns)
        if os.path.realpath(path) != os.path.realpath(self._datastore.image_path()):
            return found  # label folders: files only
        for name in sorted(os.listdir(path)):
            folder = os.path.join(path, name)
            if name.startswith(".") or name == "labels" or not os.path.isdir(folder):  # "1.2.840.5": a UID-named series
                continue
            if any(pydicom.misc.is_dicom(os.path.join(folder, f)) for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))):
                found[name] = name
        return found

    def _to_id(self, file):
        if os.path.isdir(os.path.join(self._datastore.image_path(), file)):
            return file, ""  # a series folder: its whole name ("1.2.840.5" is no id "1.2.840" with extension ".5")
        return super()._to_id(file)


class MedCAMApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        spec = conf.get("classifier", str(DEFAULT_CLASSIFIER))
        self.loaded = load_classifier(spec, conf.get("weights"))
        self.size = int(conf["size"]) if conf.get("size") else self.loaded.size
        self.spatial_dims = int(conf.get("spatial_dims") or self.loaded.spatial_dims or 2)
        self.channels = int(conf["channels"]) if conf.get("channels") else self.loaded.channels
        self.steps = int(conf.get("steps") or 300)  # a request's "steps" overrides it
        self.preprocessing, why_not = self._preprocessing(conf)
        if self.preprocessing is not None:  # the orientation only for the slices of volumes a 2D bundle's does not take
            try:
                self.orientation = self.loaded.orientation
            except ValueError:  # a 2D bundle's "RA"
                self.orientation = None
        else:
            try:  # a bundle's codes, checked here ("none": as read)
                self.orientation = conf["orientation"] if "orientation" in conf else self.loaded.orientation
            except ValueError as err:
                raise ValueError(f"{err} (--conf orientation overrides a bundle's codes: RAS, say, or none)") from err
        # the task's own default (true) unless given; "false" (a --conf word) is read as false
        self.task_settings = {name: conf[name] for name in ("skip_vacuous",) if name in conf}
        logger.info("Med-CAM classifier %s: %sD, %s channel(s), size %s", spec, self.spatial_dims, self.channels, self.size)
        if self.preprocessing is not None:
            logger.info("images go through the bundle's own preprocessing (%s); labels are inverted through it (--conf "
                        "preprocessing medcam: Med-CAM's own)", ", ".join(self.preprocessing.names))
        elif self.loaded.unapplied:
            logger.warning("the bundle's preprocessing has %s, which this app's own preparation does not do the same way "
                           "(intensities are stretched to [0, 1], images resized to the classifier's size)%s",
                           "; ".join(self.loaded.unapplied), why_not)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Med-CAM",
            description="Minimal, decision-preserving evidence masks for a frozen classifier's decisions",
            version=monai_medcam.__version__,
            labels=dict(LABELS),
        )

    def _preprocessing(self, conf: dict[str, str]):
        """The bundle's own preprocessing where ``--conf preprocessing`` (``auto``, the default: where
        the bundle has transforms Med-CAM's own preparation does not do the same way, unless ``size``
        or ``orientation`` is given) asks for it, and why not, for the warning."""
        mode = conf.get("preprocessing", "auto")
        given = [f"--conf {name}" for name in ("size", "orientation") if conf.get(name)]
        try:
            return self.loaded.choose_preprocessing(
                mode, given, "--conf preprocessing bundle applies the bundle's own and inverts the label through it")
        except ValueError as err:
            raise ValueError(f"--conf preprocessing {mode}: {err}") from err

    def init_datastore(self):
        return SeriesDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self):
        return {
            "medcam": MedCAMInferTask(
                self.loaded.network,
                spatial_dims=self.spatial_dims,
                channels=self.channels,
                size=self.size,
                orientation=self.orientation,
                preprocessing=self.preprocessing,
                target_layers=self.loaded.target_layers,
                steps=self.steps,
                **self.task_settings,
            )
        }

    def _served(self, image: str) -> bool:
        """Whether ``image``, a path rather than an id, is one this server explains: a file or folder
        in the studies folder or in the sessions store (a session's series is a folder), or a file a
        client uploaded (MONAI Label saves it as ``tmp*`` in the temporary folder). Any other path on
        the server is not served (it would read, and name, files outside the studies)."""
        if not os.path.exists(image):
            return False
        path = os.path.realpath(image)
        if os.path.isfile(path) and os.path.dirname(path) == os.path.realpath(tempfile.gettempdir()):
            return os.path.basename(path).startswith("tmp")  # NamedTemporaryFile's names: an upload
        sessions = self.sessions()
        roots = [self.studies, *([sessions.store_path] if sessions is not None else [])]
        return any(path.startswith(os.path.realpath(root) + os.sep) for root in roots)

    def infer(self, request, datastore=None):
        """MONAI Label's infer, with HTTP 4xx and a message for what the client got wrong."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; this app serves {sorted(self._infers)}.")
        image = request.get("image")
        if isinstance(image, str):
            uri = (datastore or self.datastore()).get_image_uri(image)
            if not uri and not self._served(image):
                raise HTTPException(status_code=404, detail=f"unknown image id {image!r}: not in the studies folder.")
            if uri and os.path.exists(image) and os.path.realpath(image) != os.path.realpath(uri):
                # MONAI Label reads a path that exists before it looks up an id: this one would be read from elsewhere
                raise HTTPException(status_code=409, detail=f"image id {image!r} also names a path in the server's working "
                                                            "folder, which MONAI Label would read instead; rename one of them.")
        try:
            return super().infer(request, datastore)
        except RequestError as err:
            raise HTTPException(status_code=400, detail=str(err)) from err
        except InputError as err:
            raise HTTPException(status_code=422, detail=f"cannot explain this image: {err}") from err
        except ValueError as err:  # e.g. a class index the classifier does not have
            raise HTTPException(status_code=400, detail=f"cannot explain with these parameters: {err}") from err
