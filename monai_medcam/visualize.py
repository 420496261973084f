"""Pictures for people who would rather look than read: evidence contours and side-by-side panels.

Also a correctly oriented MONAI Grad-CAM (MONAI's default normaliser maps the map's maximum to 0,
which inverts it), used for comparison panels, that leaves the classifier as it found it, and
Grad-CAM on a vision transformer's tokens (which MONAI's CAMs do not take).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import optional_import

from monai_medcam.classifiers import FrozenClassifier, _patch_size, class_indices, is_vision_transformer, layer_name, tokens_to_grid

__all__ = ["minmax_per_image", "grad_cam", "grad_cam_layer", "to_display", "save_panels", "evidence_caption", "class_names_map", "class_text"]

plt, _HAS_MPL = optional_import("matplotlib.pyplot")
logger = logging.getLogger(__name__)


def minmax_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Each map of ``(B, ...)`` stretched to [0, 1] (highest value 1; MONAI's default normaliser would make it 0)."""
    shape = (-1,) + (1,) * (maps.ndim - 1)
    flat = maps.flatten(1)
    low, high = flat.amin(1).view(shape), flat.amax(1).view(shape)
    return (maps - low) / (high - low).clamp_min(1e-8)


def grad_cam_layer(nn_module: torch.nn.Module, target_layer: str) -> str:
    """Check that :func:`grad_cam` can run on ``target_layer`` of ``nn_module`` (before any work is
    done); a ``ValueError`` names the layer (with the nearest valid names) or the classifier."""
    if isinstance(nn_module, torch.jit.ScriptModule):
        raise ValueError(
            f"Grad-CAM layer {target_layer!r}: Grad-CAM needs hooks on the layer, and hooks do not run in a "
            "TorchScript classifier; load it as a MONAI bundle or python:module:factory (with its weights) instead."
        )
    return layer_name(nn_module, target_layer, what="Grad-CAM layer")


def grad_cam(
    nn_module: torch.nn.Module,
    x: torch.Tensor,
    target_layer: str,
    class_idx: torch.Tensor | None = None,
    plus_plus: bool = False,
) -> torch.Tensor:
    """Grad-CAM (or Grad-CAM++) heatmaps ``(B, 1, *spatial)`` in [0, 1], high where the class evidence is.

    A CNN's layer goes to MONAI's ``GradCAM`` / ``GradCAMpp``. In a vision transformer
    (torchvision's ``VisionTransformer``, MONAI's ``ViT``; 2D or 3D), a layer that outputs tokens
    ``(B, N, D)`` is laid on the patch grid first (the class token dropped), which MONAI's CAMs
    cannot do; Grad-CAM++ is not offered there. For a ViT, a block's first LayerNorm (``ln_1``,
    ``norm1``) of the middle blocks usually localises best; the last block's tokens other than
    the class token get no gradient, so their map is flat (all 0).

    Args:
        nn_module: the classifier (not TorchScript: Grad-CAM needs hooks).
        x: images ``(B, C, *spatial)``.
        target_layer: the layer name (``"layer4"`` for ResNets).
        class_idx: the class per image ``(B,)``; the prediction when ``None``.
        plus_plus: MONAI's ``GradCAMpp`` instead of ``GradCAM``.
    """
    from monai.visualize import GradCAM, GradCAMpp

    grad_cam_layer(nn_module, target_layer)
    x = x.to(FrozenClassifier(nn_module, []).dtype)  # a float64 or float16 classifier (Med-CAM takes those too)
    training = nn_module.training
    nn_module.eval()
    try:
        with _left_as_found(nn_module):
            if is_vision_transformer(nn_module):
                if plus_plus:
                    raise ValueError(f"Grad-CAM++ on {type(nn_module).__name__}: only Grad-CAM is offered for vision transformers.")
                return _token_grad_cam(nn_module, x, target_layer, class_idx)
            cam = (GradCAMpp if plus_plus else GradCAM)(nn_module, target_layers=target_layer, postprocessing=lambda cam: minmax_per_image(torch.as_tensor(cam)))
            maps = [cam(x[i : i + 1], class_idx=None if class_idx is None else int(class_idx[i])) for i in range(len(x))]
    finally:
        nn_module.train(training)
    return torch.cat(maps).detach()


def _token_grad_cam(nn_module: torch.nn.Module, x: torch.Tensor, target_layer: str, class_idx: torch.Tensor | None) -> torch.Tensor:
    """Grad-CAM of a vision transformer's layer, ``(B, 1, *spatial)``: tokens ``(B, N, D)`` on the
    patch grid ``(B, D, *grid)``, the gradient's mean per channel as the channel weights."""
    store: dict[str, torch.Tensor] = {}

    def keep(_module, _args, output):
        store["out"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = dict(nn_module.named_modules())[target_layer].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # a graph even when every parameter is frozen
            logits = FrozenClassifier(nn_module, []).logits(x)  # tuple outputs, one logit z as (0, z): as Med-CAM reads them
            label = logits.argmax(1) if class_idx is None else class_indices(class_idx, len(x), logits.device, "class_idx", logits.shape[1])
            if "out" not in store:
                raise ValueError(f"Grad-CAM layer {target_layer!r} did not run in {type(nn_module).__name__}'s forward pass.")
            out = store["out"]
            (grads,) = torch.autograd.grad(logits.gather(1, label[:, None]).sum(), out)
    finally:
        handle.remove()
    if out.ndim == 3:  # tokens
        patch = _patch_size(nn_module)
        acts, grads = (tokens_to_grid(t.detach(), x.shape[2:], patch) for t in (out, grads))
        if acts.ndim != x.ndim:
            raise ValueError(f"Grad-CAM layer {target_layer!r}: its tokens {tuple(out.shape)} do not fit a patch grid of the input {tuple(x.shape)}.")
    else:
        acts = out.detach()
    weights = grads.flatten(2).mean(2).view(*grads.shape[:2], *([1] * (grads.ndim - 2)))
    cam = torch.relu((weights * acts).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear" if x.ndim == 4 else "trilinear", align_corners=False)
    return minmax_per_image(cam).detach()


@contextmanager
def _left_as_found(nn_module: torch.nn.Module) -> Iterator[None]:
    """Undo what MONAI's CAMs do to ``nn_module`` inside the block: they register a forward and a
    full backward hook on the target layer and keep no handle to remove them (left there, every
    later pass of the classifier, Med-CAM's optimisation among them, would run them, and every call
    would add two more), set the layer's ``inplace`` to False, and zero and refill every
    parameter's ``.grad``. On exit, also after an error, every hook (forward, backward and their
    pre-hooks) added inside the block is removed and the ``inplace`` flags and gradients are as before."""
    modules = list(nn_module.modules())
    hooks = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    before = [({name: set(getattr(m, name)) for name in hooks}, m._is_full_backward_hook) for m in modules]
    inplace = [(m, m.inplace) for m in modules if isinstance(getattr(m, "inplace", None), bool)]
    grads = [(p, p.grad) for p in nn_module.parameters()]
    try:
        yield
    finally:
        for m, (keys, full) in zip(modules, before):
            for name, kept in keys.items():
                for key in set(getattr(m, name)) - kept:
                    del getattr(m, name)[key]
                    for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                        getattr(m, extra).pop(key, None)
            m._is_full_backward_hook = full
        for m, flag in inplace:
            m.inplace = flag
        for p, grad in grads:
            p.grad = grad


# how radiology shows each plane, by the axis code of the slices' normal: what runs across the
# picture (left to right) and what runs down it; the patient's right on the viewer's left
_ACROSS_DOWN = {"S": ("L", "P"), "I": ("L", "P"), "A": ("L", "I"), "P": ("L", "I"), "L": ("P", "I"), "R": ("P", "I")}
_OPPOSITE = dict(zip("LRAPSI", "RLPAIS"))


def display_orientation(affine: torch.Tensor | np.ndarray) -> tuple[bool, bool, bool, tuple[str, str, str, str]] | None:
    """How to show the slices (last axis) of a volume ``(X, Y, Z)`` with ``affine`` (RAS, as MONAI
    reads it) as radiology shows their plane: axial and coronal slices with the patient's right on
    the viewer's left, anterior (axial) or superior (coronal, sagittal) up, sagittal slices with
    anterior on the left. Panels draw axis 0 across and axis 1 down (DICOM's rows and columns,
    which are shown so already; a NIfTI's storage order may be upside down).

    Returns ``(swap, flip_across, flip_down, edges)``: swap axes 0 and 1, then flip the axis drawn
    across and the one drawn down; ``edges`` the axis codes at the picture's left, right, top and
    bottom. ``None`` where the affine gives no such orientation (oblique beyond 45 degrees is
    taken to the nearest axes)."""
    from nibabel.orientations import aff2axcodes

    try:
        codes = aff2axcodes(np.asarray(affine, dtype=np.float64))
    except Exception:  # noqa: BLE001 - a singular or malformed affine: drawn as stored
        return None
    if len(codes) != 3 or None in codes:
        return None
    across, down = _ACROSS_DOWN[codes[2]]
    swap = codes[0] not in (across, _OPPOSITE[across])
    first, second = (codes[1], codes[0]) if swap else (codes[0], codes[1])
    if first not in (across, _OPPOSITE[across]) or second not in (down, _OPPOSITE[down]):
        return None
    return swap, first != across, second != down, (_OPPOSITE[across], across, _OPPOSITE[down], down)


def to_display(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """One 2D image ``(C, H, W)`` as ``(H, W, 3)`` in [0, 1], each image stretched to its own range."""
    image = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    if image.ndim == 2:
        image = image[None]
    image = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    low, high = np.percentile(image, 0.5), np.percentile(image, 99.5)
    return np.clip((image - low) / max(high - low, 1e-8), 0, 1).transpose(1, 2, 0)


def class_names_map(names: str | Sequence[str] | Mapping[object, str] | None) -> dict[int, str]:
    """Class names as ``{index: name}``: from names in class order (a sequence, or one comma-separated
    string), a mapping keyed by class index (a MONAI bundle's ``channel_def``, ``{"0": "no lesion",
    "1": "lesion"}``), or ``None`` (no names). Empty names are left out, and so are a mapping's keys
    that are not class indices (logged: they name no class)."""
    if names is None:
        return {}
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    if isinstance(names, Mapping):
        named = {int(k): v for k, v in names.items() if str(k).strip().isdigit()}
        if len(named) < len(names):
            logger.warning("class names: left out %s, which are not class indices (0, 1, ...).",
                           [k for k in names if not str(k).strip().isdigit()])
    elif isinstance(names, Sequence):
        named = dict(enumerate(names))
    else:
        raise ValueError(f"class names must be names in class order or a mapping from class index to name; got {type(names).__name__}.")
    return {k: str(v).strip() for k, v in named.items() if v is not None and str(v).strip()}


def class_text(label: int, names: Mapping[int, str] | None = None) -> str:
    """``"lesion"`` where class ``label`` has a name in ``names`` (:func:`class_names_map`), else ``"class 1"``."""
    return (names or {}).get(int(label)) or f"class {int(label)}"


def evidence_caption(row: Mapping[str, object], class_names: Mapping[int, str] | None = None, whole: str = "") -> tuple[str, str, str] | None:
    """What a panel says about one explained image, from its summary row (:meth:`MedCAMResult.summary`).

    Returns ``(decision, verdict, colour)``, e.g. ``("class 1 (prob 0.97)", "verified (alone: prob
    0.99)", "black")``, or ``("lesion (prob 0.97)", ...)`` where ``class_names``
    (:func:`class_names_map`) names the class: the label's probability on the image, then on the
    evidence alone; ``whole`` (e.g. ``"volume"``) says the decision is the whole input's. The verdict
    is red where the evidence is not verified (:func:`evidence_not_verified`: it does not keep the
    label alone and under every random background; the label's probability alone and under the
    worst background are given, so the failed check shows), grey where the classifier gives the label on a
    blank image, so that no evidence is needed (vacuous), orange where the mask ran out of steps
    before it settled; empty where the row does not say. ``None`` for a row without a decision.
    """
    label, prob = _number(row.get("label")), _number(row.get("prob_input"))
    if label is None or prob is None:
        return None
    name = class_text(int(label), class_names)
    name = name if len(name) <= 24 else name[:23] + "~"  # a panel is 2.4 inches wide
    decision = f"{whole + ': ' if whole else ''}{name} (prob {prob:.2f})"
    alone = _number(row.get("prob_evidence"))
    alone = f" (alone: prob {alone:.2f})" if alone is not None else ""
    flagged = evidence_not_verified(row)
    if flagged is None:
        return decision, "", "black"
    if flagged:  # which check failed: the label alone, or under the worst random background
        probs = {"alone": _number(row.get("prob_evidence")), "worst random background": _number(row.get("prob_background"))}
        probs = ",\n".join(f"{where}: prob {p:.2f}" for where, p in probs.items() if p is not None)
        return decision, "NOT verified" + (f" ({probs})" if probs else ""), "red"
    if summary_flag(row.get("vacuous")):
        return decision, "no evidence needed: given on a blank image", "dimgray"
    if summary_flag(row.get("settled", True)) is False:
        return decision, f"verified{alone}, unsettled", "darkorange"
    return decision, f"verified{alone}", "black"


def _number(value: object) -> float | None:
    """A summary value as a float; ``None`` where it is missing, empty, not a number or NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def evidence_not_verified(row: Mapping[str, object]) -> bool | None:
    """Whether a summary row's evidence is to be shown as NOT verified: its ``verified`` is False and
    its decision needed evidence. A vacuous decision left with an empty mask (the classifier gives
    the label on a blank image; ``skip_vacuous``) is not: there is no evidence to verify, and its
    check asks only whether random content, with nothing kept, would change the label (for "no
    lesion" it often would); a row that does not record its area is taken to hold evidence.
    ``None`` where the row does not record ``verified``."""
    verified = summary_flag(row.get("verified"))
    if verified is None:
        return None
    return not verified and needed_evidence(row)


def verification_by_slice(rows: Sequence[Mapping[str, object]], depth: int) -> list[bool | None] | None:
    """Each slice's verification from the summary rows (one row per slice along the last axis, or one
    for the whole input): ``True`` verified, ``False`` NOT verified, ``None`` no evidence needed (a
    vacuous decision left with an empty mask: :func:`needed_evidence`). ``None`` where a row does
    not record ``verified`` or the rows are neither one nor ``depth``: the outputs then claim nothing."""
    verified = [summary_flag(row.get("verified")) for row in rows]
    if not verified or None in verified or len(verified) not in (1, depth):
        return None
    return [v if needed_evidence(row) else None for v, row in zip(verified, rows)]


def evidence_labels(mask: np.ndarray | torch.Tensor, verified: Sequence[bool | None] | None) -> np.ndarray | torch.Tensor:
    """A binary ``mask`` ``(..., depth)`` as labels: 1 where the evidence was verified, 2 where it was
    NOT (``verified`` from :func:`verification_by_slice`, broadcast along the last axis; one flag
    for the whole mask broadcasts everywhere), as the NIfTI, the DICOM SEG's segments and the MONAI
    Label app write it. ``mask`` itself where nothing failed or nothing is recorded."""
    if verified is None or not any(v is False for v in verified):
        return mask
    factor = [2 if v is False else 1 for v in verified]
    if isinstance(mask, torch.Tensor):
        return mask * torch.tensor(factor, dtype=mask.dtype, device=mask.device)
    return mask * np.asarray(factor, dtype=mask.dtype)


def needed_evidence(row: Mapping[str, object]) -> bool:
    """Whether a summary row's decision needed evidence: every row but a vacuous decision left with an
    empty mask (``skip_vacuous``), which holds none to verify; a row that does not record its area
    is taken to hold evidence. Counts of verified evidence are over these rows."""
    return not (summary_flag(row.get("vacuous")) and _number(row.get("area")) == 0)


def summary_flag(value: object) -> bool | None:
    """A summary row's flag (``verified``, ...) as a bool, whether ``True``, ``1.0`` or ``"True"`` (read
    from a CSV); ``None`` where it is not recorded (``None``, empty or NaN)."""
    if isinstance(value, str):
        return None if not value.strip() else value.strip().lower() in ("true", "1", "1.0")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value)


def save_panels(
    path: str | Path,
    images: torch.Tensor,
    columns: Mapping[str, torch.Tensor],
    row_titles: Sequence[str] | None = None,
    heatmaps: Sequence[str] = (),
    notes: Mapping[str, Sequence[tuple[str, str] | None]] | None = None,
    heading: str = "",
    edges: Sequence[str] | None = None,
) -> Path:
    """Save a grid: one row per image, the image then one column per mask or heatmap.

    Args:
        path: the PNG to write (written to a temporary name, then renamed).
        images: ``(B, C, H, W)``.
        columns: title -> ``(B, 1, H, W)``; binary masks are drawn as a contour and a tint over
            the image (green; red where the row's note is red: evidence not verified), the names in
            ``heatmaps`` as a colour map over the image (its title says which way it runs).
        row_titles: one title per row.
        heatmaps: which columns are continuous heatmaps.
        notes: column title -> per row ``(text, colour)`` (or ``None``): a second title line in that
            colour, e.g. whether the evidence was verified (:func:`evidence_caption`).
        heading: a line above the grid (e.g. which of a volume's slices are shown).
        edges: the patient's directions at the images' left, right, top and bottom (``"R", "L",
            "A", "P"``; :func:`display_orientation`), marked on each image.
    """
    if not _HAS_MPL:
        raise ImportError("saving panels needs matplotlib: pip install 'monai-medcam[plot]'.")
    import matplotlib

    matplotlib.use("Agg")
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, 1 + len(columns), figsize=(2.4 * (1 + len(columns)), 2.4 * rows), squeeze=False)
    for i in range(rows):
        base = to_display(images[i])
        axes[i, 0].imshow(base)
        axes[i, 0].set_title(row_titles[i] if row_titles else "image", fontsize=8)
        for text, (x, y, ha, va) in zip(edges or (), ((0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"),
                                                     (0.5, 0.98, "center", "top"), (0.5, 0.02, "center", "bottom"))):
            axes[i, 0].text(x, y, text, transform=axes[i, 0].transAxes, ha=ha, va=va, fontsize=7, color="yellow", fontweight="bold")
        for j, (title, maps) in enumerate(columns.items(), start=1):
            value = maps[i, 0].detach().cpu().float().numpy()
            ax = axes[i, j]
            note = (notes or {}).get(title, [None] * rows)[i]
            if title in heatmaps:
                ax.imshow(base)
                ax.imshow(value, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            else:  # evidence that was not verified in red, as the DICOM SEG's segment 2
                red = bool(note and note[1] == "red")
                tint = base.copy()
                colour = np.array([1.0, 0.1, 0.1]) if red else np.array([0.0, 1.0, 0.3])
                tint[value > 0.5] = 0.5 * tint[value > 0.5] + 0.5 * colour
                ax.imshow(tint * np.where(value[..., None] > 0.5, 1.0, 0.45))
                if value.max() > 0.5 and value.min() < 0.5:
                    ax.contour(value, levels=[0.5], colors=["red" if red else "lime"], linewidths=0.8)
            text = f"{title} (blue low, red high)" if title in heatmaps else f"{title} ({(value > 0.5).mean():.1%})"
            if note and note[0]:
                ax.set_title(f"{text}\n{note[0]}", fontsize=8, color=note[1])
            else:
                ax.set_title(text, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if heading:
        fig.suptitle(heading, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.2 / fig.get_figheight()) if heading else None)
    from monai_medcam.writers import atomic_path  # writers imports this module

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
