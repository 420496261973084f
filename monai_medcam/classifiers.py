"""Adapter for any frozen classifier: logits, target-layer lookup and activation capture.

:class:`FrozenClassifier` wraps an ``nn.Module`` so the explainer can ask three things of it:
the two-or-more-class logits of a batch, the activations of the target layers for that batch,
and a guarantee that the classifier is left exactly as it was found (training flag,
``requires_grad`` and hooks) after success and after an error.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["TargetLayer", "FrozenClassifier", "default_target_layers", "is_vision_transformer", "layer_name", "class_indices",
           "LayerSpec"]

logger = logging.getLogger(__name__)

LayerSpec = str | nn.Module | Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class TargetLayer:
    """One layer whose activations the evidence must reproduce.

    Args:
        name: dotted module name inside the classifier (``"layer4"``, ``"features.7"``).
        weight: the layer's weight ``alpha_l`` in the activation-matching loss.
        distance: ``"cosine"`` (``1 - cos`` between the flattened maps; the default) or ``"mse"``
            (mean squared difference relative to the reference's mean square).
    """

    name: str
    weight: float = 1.0
    distance: str = "cosine"

    def __post_init__(self) -> None:
        if self.distance not in ("mse", "cosine"):
            raise ValueError(f"TargetLayer {self.name!r}: distance must be 'mse' or 'cosine', got {self.distance!r}.")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"TargetLayer {self.name!r}: weight must be a finite number >= 0, got {self.weight!r}.")


def _spread(names: Sequence[str]) -> list[TargetLayer]:
    """Weights 1, 2, 4, ... doubling with depth (the deepest layers matter most), capped at 8.

    Every default layer uses the cosine distance: on the known-evidence task it gave masks of the
    lesion's size (lesion IoU 0.68) where the relative MSE on the deeper layers held masks open
    (IoU 0.31); see docs/settings.md.
    """
    weights = [float(min(2**i, 8)) for i in range(len(names))]
    return [TargetLayer(n, w, "cosine") for n, w in zip(names, weights)]


def _quartiles(count: int) -> list[int]:
    """Indices of about four evenly spaced blocks out of ``count``, always ending at the last."""
    picks = sorted({max(0, round(count * q) - 1) for q in (0.25, 0.5, 0.75, 1.0)})
    return picks


def unwrapped(model: nn.Module, compiled: bool = True) -> tuple[nn.Module, str]:
    """The network inside ``DataParallel`` / ``DistributedDataParallel`` (``.module``) and, where
    ``compiled``, ``torch.compile`` (``._orig_mod``) wrappers, and the prefix of its layers' names
    in ``model``."""
    prefix = ""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model, prefix = model.module, prefix + "module."
        elif compiled and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


def is_vision_transformer(model: nn.Module) -> bool:
    """Whether ``model`` (or the network it wraps, :func:`unwrapped`) is a vision transformer that
    :func:`default_target_layers` recognises: torchvision's ``VisionTransformer`` or MONAI's ``ViT``.
    Other transformers (timm's, Swin, one inside an ``nn.Sequential``) count as other networks:
    pass ``act_weight`` for them."""
    model, _ = unwrapped(model)
    cls = type(model).__name__
    return (cls == "VisionTransformer" and hasattr(model, "encoder")) or (cls == "ViT" and hasattr(model, "blocks"))


def default_target_layers(model: nn.Module) -> list[TargetLayer]:
    """Per-architecture default target layers (``target_layers="auto"``).

    Recognised: torchvision ResNet, MobileNetV2, ConvNeXt, VisionTransformer; MONAI ResNet,
    DenseNet (121/169/201/264), ViT and EfficientNetBN. Anything else gets up to four evenly
    spaced convolution or linear layers, with a log message naming them. Wrappers
    (:func:`unwrapped`) are seen through: the layers are those of the wrapped network.
    """
    inner, prefix = unwrapped(model)
    if prefix:
        return [TargetLayer(prefix + layer.name, layer.weight, layer.distance) for layer in default_target_layers(inner)]
    cls = type(model).__name__
    children = dict(model.named_children())
    # recognised by class name and layout: a network of the same name laid out otherwise (timm's
    # ResNet with its act1, its ConvNeXt with stages) gets the evenly spaced layers below
    stem = next((n for n in ("relu", "act") if n in children), None)
    if cls == "ResNet" and stem and all(f"layer{i}" in children for i in range(1, 5)):
        names = [stem, "layer1", "layer2", "layer3", "layer4"]
        return [TargetLayer(n, w, "cosine") for n, w in zip(names, (1, 2, 2, 4, 8))]
    features = children.get("features")
    if cls == "MobileNetV2" and isinstance(features, nn.Sequential) and len(features) >= 4:
        count = len(features)  # 19 in torchvision: the last block at each resolution
        picks = [3, 6, 13, 18] if count == 19 else _quartiles(count)
        return _spread([f"features.{i}" for i in picks])
    if cls == "ConvNeXt" and isinstance(features, nn.Sequential) and len(features) >= 2:
        count = len(features)
        return _spread([f"features.{i}" for i in range(1, count, 2)])
    if is_vision_transformer(model):
        if cls == "VisionTransformer":  # torchvision
            blocks = [n for n, _ in model.encoder.layers.named_children()]
            return _spread([f"encoder.layers.{blocks[i]}" for i in _quartiles(len(blocks))])
        return _spread([f"blocks.{i}" for i in _quartiles(len(model.blocks))])  # MONAI's ViT
    if cls.startswith("DenseNet") and hasattr(model, "features"):
        feats = dict(model.features.named_children())
        names = [f"features.{n}" for n in ("transition1", "transition2", "transition3", "norm5") if n in feats]
        return _spread(names)
    if cls.startswith("EfficientNet") and hasattr(model, "_blocks"):
        names = [f"_blocks.{i}" for i in _quartiles(len(model._blocks))][:-1] + ["_bn1"]
        return _spread(names)
    # auxiliary heads (GoogLeNet's aux1/aux2, Inception v3's AuxLogits) do not run in eval mode
    candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
                  and not any(part.lower().startswith("aux") for part in n.split("."))]
    if not candidates:
        raise ValueError(
            f"target_layers='auto': no convolution or linear layer found in {cls}; pass target_layers explicitly."
        )
    body = candidates[:-1] or candidates  # the last linear layer is usually the head
    picks = [body[i] for i in _quartiles(len(body))]
    logger.info("target_layers='auto' does not know %s; using %s", cls, picks)
    return _spread(picks)


def _patch_size(model: nn.Module) -> tuple[int, ...] | None:
    """The patch size of a vision transformer, from torchvision's attribute or a patch-embedding conv."""
    model, _ = unwrapped(model)
    size = getattr(model, "patch_size", None)
    if isinstance(size, int):
        return (size,)
    if isinstance(size, (tuple, list)):
        return tuple(int(s) for s in size)
    for name, module in model.named_modules():
        if "patch" in name.lower() and isinstance(module, nn.modules.conv._ConvNd):
            return tuple(int(s) for s in module.kernel_size)
        if isinstance(module, nn.modules.conv._ConvNd):
            break
    return None


def tokens_to_grid(tokens: torch.Tensor, spatial: Sequence[int], patch: Sequence[int] | None) -> torch.Tensor:
    """Turn transformer tokens ``(B, N, D)`` into a feature map ``(B, D, *grid)``.

    The grid is ``spatial // patch`` (one entry per spatial dimension); the leading
    ``N - prod(grid)`` tokens (class and register tokens) are dropped. Without a known patch
    size the tokens are kept as a 1D sequence ``(B, D, N)``.
    """
    if patch is None:
        return tokens.transpose(1, 2)
    patch = list(patch) * len(spatial) if len(patch) == 1 else list(patch)
    grid = [s // p for s, p in zip(spatial, patch)]
    n_grid = math.prod(grid)
    n_prefix = tokens.shape[1] - n_grid
    if n_prefix < 0:
        return tokens.transpose(1, 2)
    return tokens[:, n_prefix:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def index_tensor(class_idx: int | Sequence[int] | torch.Tensor, what: str = "class_idx") -> torch.Tensor:
    """``class_idx`` as a flat tensor; anything that is not numbers (a string, booleans) is a ``ValueError``."""
    try:
        if isinstance(class_idx, (str, bytes)):
            raise TypeError
        given = torch.as_tensor(class_idx).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what} must be a class index or one per image (ints), got {class_idx!r}.") from err
    if given.dtype == torch.bool:
        raise ValueError(f"{what} must be class indices, not booleans, got {class_idx!r}.")
    return given


def class_indices(
    class_idx: int | Sequence[int] | torch.Tensor, count: int, device: torch.device | str, what: str = "class_idx",
    classes: int | None = None,
) -> torch.Tensor:
    """``class_idx`` (one class for all, or one per image) as ``(count,)`` long indices on ``device``;
    a value that is not whole, a wrong count, or (given ``classes``) one out of range is a ``ValueError``."""
    given = index_tensor(class_idx, what).to(device)
    if given.is_floating_point() and not torch.equal(given, given.round()):
        known = f" (0..{classes - 1})" if classes is not None else ""
        raise ValueError(f"{what} {given.tolist()} must be whole class indices{known}.")
    label = given.long()
    if label.numel() == 1:
        label = label.expand(count).clone()
    if label.numel() != count:
        raise ValueError(f"{what} gives {label.numel()} labels for a batch of {count} images.")
    if classes is not None and ((label < 0) | (label >= classes)).any():
        raise ValueError(f"{what} {label.tolist()} out of range: the classifier has {classes} classes (0..{classes - 1}).")
    return label


def layer_name(model: nn.Module, spec: LayerSpec, what: str = "target layer") -> str:
    """Dotted name of a layer of ``model`` given by name, module or callable ``model -> module``;
    an unknown name raises a ``ValueError`` that lists the nearest valid ones."""
    if callable(spec) and not isinstance(spec, (str, nn.Module)):
        spec = spec(model)
    if isinstance(spec, nn.Module):
        for name, module in model.named_modules():
            if module is spec:
                return name
        raise ValueError(f"{what} {type(spec).__name__} is not a submodule of {type(model).__name__}.")
    if isinstance(spec, str):
        names = [n for n, _ in model.named_modules() if n]
        if spec in names:
            return spec
        near = difflib.get_close_matches(spec, names, n=5, cutoff=0.5) or names[:5]
        raise ValueError(f"{what} {spec!r} not found in {type(model).__name__}; nearest valid names: {near}.")
    raise TypeError(f"{what} must be a name, a module or a callable, got {type(spec).__name__}.")


class FrozenClassifier:
    """A frozen view of a classifier with activation capture on its target layers.

    Args:
        nn_module: the classifier; maps ``(B, C, *spatial)`` to logits ``(B, K)`` (``K >= 2``, softmax)
            or ``(B, 1)`` / ``(B,)`` (one logit, sigmoid). A tuple output (MONAI ViT) uses its first item.
        target_layers: ``"auto"`` for the per-architecture defaults, or one layer or a sequence
            (any iterable, an ``nn.ModuleList``) of layer names, modules of the classifier,
            callables ``model -> module`` or :class:`TargetLayer`; an empty sequence turns
            activation matching off. A TorchScript classifier takes only ``"auto"`` (meaning
            ``[]``) or ``[]``: forward hooks do not run inside a scripted graph.
        layer_weights: optional per-layer weights, overriding the defaults.
        layer_distances: optional per-layer distances (``"mse"`` or ``"cosine"``).

    ``is_transformer`` (:func:`is_vision_transformer`) chooses the defaults of
    :data:`~monai_medcam.settings.BY_CLASSIFIER`.

    Use ``with classifier.frozen():`` around all calls; inside it the classifier is in eval mode
    with no parameter gradients and hooks are in place; on exit everything is restored.
    """

    def __init__(
        self,
        nn_module: nn.Module,
        target_layers: str | Sequence[LayerSpec | TargetLayer] = "auto",
        layer_weights: Sequence[float] | None = None,
        layer_distances: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(nn_module, nn.Module):
            raise TypeError(f"nn_module must be a torch.nn.Module, got {type(nn_module).__name__}.")
        self.model = nn_module
        # DataParallel's replicas would share the capture hooks (the last replica's rows kept): the
        # network inside it runs, on the input's device, as (Distributed)DataParallel runs it in one
        # process; a compiled network stays compiled
        self._network = unwrapped(nn_module, compiled=False)[0]
        self.layers = self._resolve(target_layers, layer_weights, layer_distances)
        self._modules = [self.model.get_submodule(layer.name) for layer in self.layers]
        self._patch = _patch_size(nn_module)
        self.is_transformer = is_vision_transformer(nn_module)
        self._captured: dict[int, torch.Tensor] | None = None
        self._spatial: tuple[int, ...] = ()
        self._cast = False  # the classifier is not float32: its activations and logits come back as float32

    # -- layer lookup -------------------------------------------------------------------------
    def _resolve(
        self,
        target_layers: str | Sequence[LayerSpec | TargetLayer],
        layer_weights: Sequence[float] | None,
        layer_distances: Sequence[str] | None,
    ) -> list[TargetLayer]:
        scripted = isinstance(self.model, torch.jit.ScriptModule)
        if isinstance(target_layers, str) and target_layers == "auto":
            if scripted:
                logger.warning("target_layers='auto' on a TorchScript classifier: forward hooks do not run in "
                               "TorchScript, so activation matching is off (target_layers=[]).")
            target_layers = [] if scripted else default_target_layers(self.model)
        elif isinstance(target_layers, (nn.ModuleList, nn.ModuleDict)):  # containers that never run: their members
            target_layers = list(target_layers.values() if isinstance(target_layers, nn.ModuleDict) else target_layers)
        elif isinstance(target_layers, (str, nn.Module, TargetLayer)) or callable(target_layers):
            target_layers = [target_layers]  # one layer (a module that runs is one layer, even a Sequential)
        elif isinstance(target_layers, Iterable) and not isinstance(target_layers, Mapping):
            target_layers = list(target_layers)
        else:
            raise TypeError(f"target_layers must be 'auto', a layer (name, module, callable or TargetLayer) or a "
                            f"sequence of layers, got {type(target_layers).__name__}.")
        if scripted and len(target_layers):
            raise ValueError("the classifier is TorchScript, where forward hooks do not run: pass target_layers=[] "
                             "(activation matching off) or the Python module.")
        layers = []
        for spec in target_layers:
            if isinstance(spec, TargetLayer):
                self._name_of(spec.name)
                layers.append(spec)
            else:
                layers.append(TargetLayer(self._name_of(spec)))
        for what, values in (("layer_weights", layer_weights), ("layer_distances", layer_distances)):
            if values is not None and len(values) != len(layers):
                raise ValueError(
                    f"{what} has {len(values)} entries but there are {len(layers)} target layers "
                    f"({[layer.name for layer in layers]})."
                )
        if layer_weights is not None:
            layers = [TargetLayer(layer.name, float(w), layer.distance) for layer, w in zip(layers, layer_weights)]
        if layer_distances is not None:
            layers = [TargetLayer(layer.name, layer.weight, d) for layer, d in zip(layers, layer_distances)]
        given = [(layer.name, layer.distance) for layer in layers]
        twice = sorted({name or "(the output)" for name, distance in given if given.count((name, distance)) > 1})
        if twice:  # each would count its layer's term again
            raise ValueError(f"target layers {twice} are given more than once with one distance; give each once "
                             "(layer_weights sets its weight).")
        return layers

    def _name_of(self, spec: LayerSpec) -> str:
        return layer_name(self.model, spec)

    # -- freezing and hooks -------------------------------------------------------------------
    @contextmanager
    def frozen(self) -> Iterator[FrozenClassifier]:
        """Eval mode, no parameter gradients and capture hooks, all restored on exit (even on error)."""
        training = {m: m.training for m in self.model.modules()}
        grads = {p: p.requires_grad for p in self.model.parameters()}
        handles = []
        try:
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
            for index, module in enumerate(self._modules):
                handles.append(module.register_forward_hook(functools.partial(self._hook, index)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in grads.items():
                p.requires_grad_(flag)
            for m, flag in training.items():
                m.train(flag)
            self._captured = None

    def _hook(self, index: int, module: nn.Module, args: object, output: object) -> None:
        """Keep the layer's output (its last call, if a layer runs more than once per forward)."""
        if self._captured is None:
            return
        if isinstance(output, (tuple, list)):
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"target layer {type(module).__name__} returned {type(output).__name__}, not a tensor.")
        if output.ndim == 3 and self._patch is not None:
            output = tokens_to_grid(output, self._spatial, self._patch)
        if self._cast and output.is_floating_point():
            output = output.float()
        self._captured[index] = output

    # -- forward ------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The classifier's floating dtype (its first floating parameter's); float32 when it has none."""
        return next((t.dtype for t in self.model.parameters() if t.is_floating_point()), torch.float32)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` with ``K >= 2``: a single logit ``z`` becomes ``(0, z)`` so softmax is sigmoid.

        ``x`` is cast to the classifier's dtype (a float64 or float16 classifier takes the float32
        evidence) and its logits come back as float32."""
        dtype = self.dtype
        self._cast = dtype != torch.float32
        out = self._network(x.to(dtype) if self._cast and x.dtype != dtype else x)
        taken = ""
        if isinstance(out, (tuple, list)):
            out, taken = out[0], f" (the first item of the {type(out).__name__} it returned)"
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the classifier returned {type(out).__name__}{taken}; expected a logits tensor (B, K).")
        if self._cast and out.is_floating_point():
            out = out.float()
        count, returned = x.shape[0], tuple(out.shape)
        if out.ndim == 0 and count == 1:  # a batch of one, squeezed: one logit
            out = out.reshape(1, 1)
        elif out.ndim == 1 and count == 1:  # a batch of one, squeezed: its K logits
            out = out[None]
        elif out.ndim == 1 and len(out) == count:  # one logit per image
            out = out[:, None]
        if out.ndim != 2 or out.shape[0] != count:
            raise ValueError(f"the classifier returned shape {returned}{taken} for input {tuple(x.shape)}; expected (B, K).")
        if out.shape[1] == 1:
            out = torch.cat([torch.zeros_like(out), out], dim=1)
        return out

    def logits_and_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``(B, K)`` and the target layers' activations, each ``(B, C_l, *spatial_l)``."""
        self._captured = {}
        self._spatial = tuple(x.shape[2:])
        try:
            logits = self.logits(x)
            missing = [layer.name for i, layer in enumerate(self.layers) if i not in self._captured]
            if missing:
                raise ValueError(f"target layers {missing} did not run in the classifier's forward pass; pass target_layers "
                                 "naming layers that do (or target_layers=[] to match the output only).")
            return logits, [self._captured[i] for i in range(len(self.layers))]
        finally:
            self._captured = None
