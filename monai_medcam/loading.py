"""Loading the classifier to explain: a TorchScript file, a MONAI bundle folder, or a Python factory.

Nothing here unpickles arbitrary objects: TorchScript archives are loaded with ``torch.jit.load``
and state dicts with ``torch.load(..., weights_only=True)``. A file that is a plain pickle (a whole
``nn.Module`` saved with ``torch.save``) is refused with a message saying what to do instead.
"""

from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["LoadedClassifier", "load_classifier", "load_state_dict", "input_format"]


@dataclass
class LoadedClassifier:
    """A classifier and what it expects, where known.

    Attributes:
        network: the module, in eval mode, on CPU.
        spatial_dims: 2 or 3.
        channels: input channels.
        size: the spatial size it was trained at (images are resized to it), or ``None`` to keep sizes.
        source: where it came from, for messages.
        class_names: the classes' names by index, where known (a bundle's
            ``network_data_format.outputs.pred.channel_def``).
        orientation_codes: the axis codes volumes were reoriented to for it, as found (a bundle's
            ``Orientationd`` in its preprocessing), else ``None`` (volumes as read).
        orientation_source: where they were found, for messages.
        unapplied: transforms of a bundle's preprocessing that Med-CAM's own (``to_classifier_space``)
            does not do the same way (``Spacingd``, an intensity window, a crop, ...), by name.
        preprocessing_config: a bundle's parsed config and its file, where it has a ``preprocessing``
            (:meth:`bundle_preprocessing` builds it).
        files: the files it was built from (a TorchScript file, a state dict, a bundle's configs and
            weights), for the run's record (:mod:`monai_medcam.provenance`).
    """

    network: torch.nn.Module
    spatial_dims: int | None
    channels: int | None
    size: tuple[int, ...] | None
    source: str
    class_names: dict | None = None
    orientation_codes: object = None
    orientation_source: str = "orientation"
    unapplied: list[str] = field(default_factory=list)
    preprocessing_config: tuple | None = field(default=None, repr=False)
    files: list[Path] = field(default_factory=list)

    def bundle_preprocessing(self):
        """The bundle's ``preprocessing``, instantiated, as a :class:`~monai_medcam.preprocessing.BundlePreprocessing`
        (its loader left out), or ``None`` where the classifier has none.

        Raises:
            ValueError: it cannot be built or run here; the message names the bundle's config file.
        """
        from monai_medcam.preprocessing import BundlePreprocessing

        if self.preprocessing_config is None:
            return None
        parser, config = self.preprocessing_config
        loader = [name for name in self.unapplied if name.startswith("LoadImage")]
        if loader:  # medcam's own loader reads each file; the bundle's options for it would be lost
            raise ValueError(f"{config}: the preprocessing's loader has options Med-CAM's loader does not take ({', '.join(loader)}).")
        try:
            transform = parser.get_parsed_content("preprocessing", instantiate=True, lazy=False)  # not the cached, uninstantiated one
        except Exception as err:
            raise ValueError(f"{config}: cannot build the preprocessing ({type(err).__name__}: {err}).") from err
        return BundlePreprocessing(transform, str(config))

    def choose_preprocessing(self, mode: str, given: list[str], hint: str):
        """Which preprocessing prepares inputs: the bundle's own (returned, built) or Med-CAM's own
        (``None``, with why not, to end a warning). The command line and the MONAI Label app decide
        so, each naming its own options.

        Args:
            mode: ``"auto"`` (the bundle's own where its preprocessing has transforms Med-CAM's own
                does not do the same way, ``unapplied``, unless options of Med-CAM's own are given),
                ``"bundle"`` or ``"medcam"``.
            given: the options of Med-CAM's own preprocessing that were given (``--size``, ...), as
                the caller spells them.
            hint: how to ask for the bundle's own, for the reason.

        Raises:
            ValueError: an unknown ``mode``, or ``"bundle"`` where the bundle's own cannot be used.
        """
        if mode not in ("auto", "bundle", "medcam"):
            raise ValueError(f"give auto, bundle or medcam, not {mode!r}.")
        if mode == "bundle" and self.preprocessing_config is None:
            raise ValueError(f"{self.source} is not a MONAI bundle with a preprocessing.")
        if mode == "bundle" and given:
            raise ValueError(f"{' and '.join(given)} set how Med-CAM's own preprocessing prepares inputs; with the "
                             "bundle's own, leave them out.")
        if mode == "medcam" or self.preprocessing_config is None or (mode == "auto" and not self.unapplied):
            return None, f" ({hint})"
        if given:  # auto: options of Med-CAM's own preprocessing ask for it
            return None, f" ({' and '.join(given)} given: Med-CAM's own preprocessing; {hint})"
        try:
            return self.bundle_preprocessing(), ""
        except ValueError as err:
            if mode == "bundle":
                raise
            return None, f"; the bundle's own cannot run here: {str(err).rstrip('.')}"

    @property
    def orientation(self) -> str | None:
        """``orientation_codes`` checked: three axis codes, or ``None``. Checked here, when used, so
        that codes a bundle's own transforms take but Med-CAM does not (``"RA"`` of a 2D bundle) can
        be overridden (``--orientation none``) rather than stop the loading.

        Raises:
            ValueError: the codes are not three axis codes; the message says where they came from.
        """
        from monai_medcam.orientation import check_orientation

        return check_orientation(self.orientation_codes, self.orientation_source)

    @property
    def target_layers(self) -> str | list:
        """``"auto"``, or ``[]`` for TorchScript: forward hooks do not run inside a scripted graph, so
        activation matching is off and the output, decision and robustness terms carry the explanation."""
        return [] if isinstance(self.network, torch.jit.ScriptModule) else "auto"


def input_format(network: torch.nn.Module) -> tuple[int | None, int | None]:
    """``(spatial_dims, channels)`` read off the first convolution-like weight ``(out, in, *kernel)``."""
    for _, param in network.named_parameters():
        if param.ndim in (4, 5):
            return param.ndim - 2, int(param.shape[1])
    return None, None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` with ``weights_only=True``; anything else is refused with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path}: refused: not a plain state dict loadable with weights_only=True ({type(err).__name__}). "
            "Save weights with torch.save(model.state_dict(), path), or export the model with torch.jit.save."
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}.")
    return state


def _torchscript(path: Path) -> LoadedClassifier:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+ deprecates TorchScript, which still loads safely
            network = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ValueError(
            f"{path}: refused: not a TorchScript archive ({type(err).__name__}). Only TorchScript files "
            "(torch.jit.save) are accepted as --classifier files, because unpickling a file can run arbitrary code; "
            "for a state dict, give the architecture as python:module:factory and the file as --weights."
        ) from err
    dims, channels = input_format(network)
    return LoadedClassifier(network.eval(), dims, channels, None, str(path), files=[path])


def _factory(spec: str, weights: str | Path | None) -> LoadedClassifier:
    try:
        _, module_name, attr = spec.split(":")
    except ValueError:
        raise ValueError(f"{spec}: a factory is written python:package.module:function.") from None
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{spec}: cannot import the factory ({err}).") from err
    network = factory()
    if not isinstance(network, torch.nn.Module):
        raise ValueError(f"{spec}: the factory returned {type(network).__name__}, not a torch.nn.Module.")
    if weights is not None:
        network.load_state_dict(load_state_dict(weights))
    dims, channels = input_format(network)
    return LoadedClassifier(network.eval(), dims, channels, None, spec, files=[] if weights is None else [Path(weights)])


# transforms of a bundle's preprocessing that change nothing medcam explain depends on (loading,
# channels first, types, devices, copies; an Orientation(d) without codes); LoadImage(d),
# ScaleIntensity(d) and Resize(d) are judged by their arguments (_bundle_preprocessing), any other
# is named in a warning
_HARMLESS = {
    "Compose", "Orientation", "Orientationd", "LoadInput", "LoadInputd", "ToClassifierSpace", "ToClassifierSpaced", "EnsureChannelFirst", "EnsureChannelFirstd",
    "AddChannel", "AddChanneld", "AsChannelFirst", "AsChannelFirstd", "EnsureType", "EnsureTyped", "ToTensor", "ToTensord",
    "ToNumpy", "ToNumpyd", "ToDevice", "ToDeviced", "CastToType", "CastToTyped", "Identity", "Identityd", "CopyItemsd",
    "DeleteItemsd", "SelectItemsd",
}
# a loader's arguments that change neither the image's values nor its geometry
_LOADER_ARGS = {
    "keys", "image_only", "ensure_channel_first", "reader", "dtype", "allow_missing_keys", "simple_keys", "meta_keys",
    "meta_key_postfix", "overwriting", "prune_meta_pattern", "prune_meta_sep", "expanduser", "as_closest_canonical",
}


def _transforms(node) -> list[dict]:
    """The transforms (``{"_target_": ...}``) of a bundle's resolved ``preprocessing``, in order: a
    ``Compose``'s ``transforms`` are followed, other arguments (a loader's ``reader``) are not;
    disabled ones (``"_disabled_": true``) are left out."""
    from monai.bundle import ConfigItem

    if isinstance(node, ConfigItem):
        node = node.get_config()
    if isinstance(node, (list, tuple)):
        return [t for child in node for t in _transforms(child)]
    if not isinstance(node, dict) or str(node.get("_disabled_", "")).lower() == "true":
        return []
    if "_target_" not in node:
        return [t for child in node.values() for t in _transforms(child)]
    return [node, *_transforms(node.get("transforms"))]


def _resized_like_medcam(node: dict, size: tuple[int, ...] | None) -> bool:
    """Whether a ``Resize(d)`` does what medcam explain does: stretch to the classifier's ``size``
    (a 2D classifier's ``(H, W, -1)`` too: slices resized, their count kept)."""
    wanted = node.get("spatial_size")
    wanted = list(wanted) if isinstance(wanted, (list, tuple)) else [wanted] * len(size or ())
    if size and len(wanted) == len(size) + 1 and wanted[-1] == -1:
        wanted = wanted[:-1]
    return bool(size) and node.get("size_mode", "all") == "all" and tuple(wanted) == tuple(size)


def _loader_options(name: str, node: dict) -> str | None:
    """A loader's options that change the image Med-CAM's own loader gives (``LoadImaged(reverse_indexing)``),
    or ``None``. A reader given other than by its bare class (with arguments, or built by an
    expression) counts as "reader options": its ``reverse_indexing``, converter or ``swap_ij`` would be lost."""
    from monai.bundle import ConfigItem

    meta = {"_target_", "_desc_", "_requires_", "_disabled_", "_mode_"}
    extra = sorted(set(node) - _LOADER_ARGS - meta)
    reader = node.get("reader")
    reader = reader.get_config() if isinstance(reader, ConfigItem) else reader
    bare = reader is None or (isinstance(reader, str) and not reader.startswith(("$", "@"))) or (isinstance(reader, dict) and not set(reader) - meta)
    if not bare:
        extra.append("reader options")
    return f"{name}({', '.join(extra)})" if extra else None


def _bundle_preprocessing(parser, config: Path, size: tuple[int, ...] | None) -> tuple[object, str, list[str]]:
    """What a bundle's ``preprocessing`` (references and expressions resolved, nothing instantiated)
    says about how its classifier saw images: the axis codes of its first ``Orientation(d)`` (``RAS``
    for ``as_closest_canonical``, also a loader's; Med-CAM's ``ToClassifierSpace(d)`` orientation),
    unchecked, and where they are; and the transforms medcam explain does not do the same way."""
    if "preprocessing" not in parser:
        return None, "orientation", []
    try:
        tree = parser.get_parsed_content("preprocessing", instantiate=False)
    except Exception as err:  # an expression that does not evaluate without instantiating, say
        return None, "orientation", [f"a part that could not be read ({type(err).__name__}: {err})"]
    codes, where, unapplied = None, "orientation", []
    for node in _transforms(tree):
        name = str(node["_target_"]).rsplit(".", 1)[-1]
        if name in ("LoadImage", "LoadImaged"):  # its options first: a loader may reorient too (as_closest_canonical)
            label = _loader_options(name, node)
            if label and label not in unapplied:
                unapplied.append(label)
        found = None
        if name in ("Orientation", "Orientationd", "LoadImage", "LoadImaged") and node.get("as_closest_canonical") is True:
            found = "RAS"
        elif name in ("Orientation", "Orientationd"):
            found = node.get("axcodes")
        elif name in ("ToClassifierSpace", "ToClassifierSpaced"):
            found = node.get("orientation")
        if found is not None:
            if codes is None:
                codes, where = found, f"{config}: preprocessing {name}"
            elif found != codes:
                unapplied.append(f"{name}({found}) after {codes}")
            continue
        if name in ("LoadImage", "LoadImaged"):
            continue
        if name in ("ScaleIntensity", "ScaleIntensityd"):  # medcam explain scales the whole input to [0, 1]
            same = (node.get("minv", 0.0) == 0 and node.get("maxv", 1.0) == 1 and node.get("factor") is None
                    and not node.get("channel_wise", False))
            label = None if same else name
        elif name in ("Resize", "Resized"):
            label = None if _resized_like_medcam(node, size) else f"{name}({node.get('spatial_size')})"
        else:
            label = None if name in _HARMLESS else name
        if label and label not in unapplied:
            unapplied.append(label)
    return codes, where, unapplied


def _bundle(folder: Path) -> LoadedClassifier:
    """``network_def`` of ``configs/inference.json`` with ``models/model.pt`` (or ``models/model.ts``)."""
    from monai.bundle import ConfigParser

    config = next((folder / "configs" / n for n in ("inference.json", "inference.yaml") if (folder / "configs" / n).is_file()), None)
    if config is None:
        raise ValueError(f"{folder}: not a MONAI bundle (no configs/inference.json).")
    scripted = folder / "models" / "model.ts"
    weights = folder / "models" / "model.pt"
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(folder)
    if scripted.is_file() and not weights.is_file():
        loaded = _torchscript(scripted)
    else:
        try:
            network = parser.get_parsed_content("network_def", instantiate=True)
        except Exception as err:
            raise ValueError(f"{config}: cannot build network_def ({err}).") from err
        if not weights.is_file():
            raise ValueError(f"{folder}: the bundle has no models/model.pt (or models/model.ts).")
        network.load_state_dict(load_state_dict(weights))
        dims, channels = input_format(network)
        loaded = LoadedClassifier(network.eval(), dims, channels, None, str(folder), files=[weights])
    meta_file = folder / "configs" / "metadata.json"
    loaded.files = [config, *([meta_file] if meta_file.is_file() else []), *loaded.files]
    if meta_file.is_file():
        data_format = json.loads(meta_file.read_text()).get("network_data_format", {})
        image = data_format.get("inputs", {}).get("image", {})
        names = data_format.get("outputs", {}).get("pred", {}).get("channel_def")
        if isinstance(names, dict) and names:  # keys that are not class indices are left out when used
            loaded.class_names = names
        shape = image.get("spatial_shape")
        if shape and all(isinstance(s, int) for s in shape):
            loaded.size = tuple(shape)
            loaded.spatial_dims = len(shape)
        loaded.channels = image.get("num_channels", loaded.channels)
    loaded.orientation_codes, loaded.orientation_source, loaded.unapplied = _bundle_preprocessing(parser, config, loaded.size)
    if "preprocessing" in parser:
        loaded.preprocessing_config = (parser, config)
    return loaded


def load_classifier(spec: str | Path, weights: str | Path | None = None) -> LoadedClassifier:
    """Load ``spec``: a TorchScript file, a MONAI bundle folder, or ``python:module:factory`` (+ ``weights``).

    Raises:
        ValueError: the classifier cannot be loaded safely; the message names the file and says why.
    """
    text = str(spec)
    if text.startswith("python:"):
        return _factory(text, weights)
    path = Path(text)
    if path.is_dir():
        return _bundle(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such classifier file or bundle folder.")
    if weights is not None:
        raise ValueError(f"{path}: --weights goes with a python:module:factory classifier, not a TorchScript file.")
    return _torchscript(path)
