"""Saliency baselines the quality benchmark compares Med-CAM with (2D and 3D).

- :func:`grad_cams`: the package's :func:`~monai_medcam.visualize.grad_cam`: MONAI ``GradCAM`` /
  ``GradCAMpp`` on a CNN layer (min-max normalised per image, not inverted); for a vision
  transformer, Grad-CAM on a block's tokens laid back on the patch grid (MONAI's CAMs expect a
  convolutional feature map). :func:`grad_cam_layers` lists the layers Grad-CAM may be given (the
  benchmark picks the best on its tuning images).
- :func:`occlusion`: MONAI ``OcclusionSensitivity``, the drop of the label's probability (softmax
  over the classifier's outputs; MONAI's own ``activate=True`` chooses sigmoid or softmax by the
  *input's* channel count, so a one-channel image would get a sigmoid of each logit).
- :func:`extremal_perturbation`: a smooth mask of a fixed area that best preserves the label when
  the rest of the image is blurred (Fong, Patrick and Vedaldi, ICCV 2019, simplified).

Every function returns maps ``(B, 1, *spatial)`` in [0, 1], high where the evidence is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from monai_medcam.backgrounds import baseline_image
from monai_medcam.classifiers import FrozenClassifier, is_vision_transformer
from monai_medcam.visualize import grad_cam, minmax_per_image

__all__ = ["grad_cam_layers", "grad_cams", "occlusion", "extremal_perturbation"]


def grad_cams(net: torch.nn.Module, x: torch.Tensor, layer: str, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"Grad-CAM": maps, "Grad-CAM++": maps}`` (only Grad-CAM for a vision transformer)."""
    maps = {"Grad-CAM": grad_cam(net, x, layer, label)}
    if not is_vision_transformer(net):  # MONAI's Grad-CAM++ needs a convolutional map
        maps["Grad-CAM++"] = grad_cam(net, x, layer, label, plus_plus=True)
    return maps


def grad_cam_layers(net: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """The layers Grad-CAM may be given, shallow to deep.

    A vision transformer: every encoder block's output and its first LayerNorm (where Grad-CAM
    for ViTs is usually taken). A CNN: the last module at each resolution of stride 4 or more
    among the children of its ``features`` (MobileNet, ConvNeXt, DenseNet) or of the network
    itself (ResNet), found by one forward pass of ``x`` ``(B, C, *spatial)``: the end of each
    stage. At 64 px a CNN's last stage is 2 x 2 (1 voxel for the 3D DenseNet at 32^3), too
    coarse for a lesion of 2% of the image; an earlier stage may localise it."""
    if is_vision_transformer(net):
        if hasattr(net, "encoder"):  # torchvision's
            blocks, norm = [f"encoder.layers.{name}" for name, _ in net.encoder.layers.named_children()], "ln_1"
        else:  # MONAI's
            blocks, norm = [f"blocks.{i}" for i in range(len(net.blocks))], "norm1"
        return [name for block in blocks for name in (f"{block}.{norm}", block)]
    parent, prefix = (net.features, "features.") if isinstance(getattr(net, "features", None), torch.nn.Sequential) else (net, "")
    sizes: dict[str, tuple[int, ...]] = {}
    pools = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d)
    handles = [child.register_forward_hook(lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[2:])))
               for name, child in parent.named_children() if not isinstance(child, pools)]  # not the head's global pool
    try:
        with torch.no_grad(), FrozenClassifier(net, []).frozen():
            net(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    spatial = tuple(x.shape[2:])
    stage_ends = {}  # resolution -> the last child at it (insertion order: shallow to deep)
    for name, size in sizes.items():
        if len(size) == len(spatial) and all(4 * s <= full for s, full in zip(size, spatial)):
            stage_ends.pop(size, None)
            stage_ends[size] = name
    return [prefix + name for name in stage_ends.values()]


def occlusion(net: torch.nn.Module, x: torch.Tensor, label: torch.Tensor, mask_size: int, overlap: float = 0.25) -> torch.Tensor:
    """MONAI occlusion sensitivity: how much the label's probability drops when a patch is occluded."""
    from monai.visualize import OcclusionSensitivity

    occ = OcclusionSensitivity(net, mask_size=mask_size, overlap=overlap, n_batch=32, verbose=False, activate=_probabilities)
    maps = []
    for i in range(len(x)):
        sens, _ = occ(x[i : i + 1])  # (1, classes, *spatial) in MONAI 1.6
        k = int(label[i])
        maps.append(-sens[:, k : k + 1])
    return minmax_per_image(torch.cat(maps).detach())


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from logits ``(B, K)``: softmax, or a sigmoid for one logit."""
    return logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(1)


def _smooth(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 1, *spatial)``."""
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=m.dtype, device=m.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    conv = F.conv2d if m.ndim == 4 else F.conv3d
    for dim in range(m.ndim - 2):
        shape = [1, 1] + [1] * (m.ndim - 2)
        shape[2 + dim] = len(kernel)
        pad = [0, 0] * (m.ndim - 2)
        pad[2 * (m.ndim - 3 - dim)] = pad[2 * (m.ndim - 3 - dim) + 1] = radius
        m = conv(F.pad(m, pad, mode="replicate"), kernel.view(shape))
    return m


def extremal_perturbation(
    net: torch.nn.Module,
    x: torch.Tensor,
    label: torch.Tensor,
    area: torch.Tensor,
    steps: int = 150,
    stride: int | None = None,
    lr: float = 0.1,
) -> torch.Tensor:
    """Smooth masks ``(B, 1, *spatial)`` of a fixed area per image that preserve the label on a blurred image.

    The mask is a sigmoid on a grid ``stride`` times coarser than the image (default: about 32
    cells along the shortest side, as TorchRay's step of 7 px gives at 224 px: 2 px at 64 px),
    upsampled and Gaussian-smoothed (sigma ``stride / 2``); the evidence is ``m x + (1 - m) blur(x)``; the loss is the label's negative
    log-probability plus ``lambda * ||sort(m) - r_a||^2``, where ``r_a`` holds ``area`` ones, with
    ``lambda`` growing from 10 to 1000 over the steps (the area constraint tightens as in the paper).

    Args:
        area: the target area fraction per image ``(B,)`` (e.g. Med-CAM's evidence area).
    """
    spatial = x.shape[2:]
    stride = stride or max(1, round(min(spatial) / 32))
    coarse = [max(2, s // stride) for s in spatial]
    blurred = baseline_image(x, "blur")
    param = torch.zeros(len(x), 1, *coarse, device=x.device, requires_grad=True)
    optimizer = torch.optim.Adam([param], lr=lr)
    count = int(torch.tensor(spatial).prod())
    ranks = torch.arange(count, device=x.device)[None].float()
    target = (ranks >= count - (area.to(x.device)[:, None] * count).round()).float()  # sorted ascending: ones last
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    with torch.enable_grad(), FrozenClassifier(net, []).frozen():  # eval mode, no weight gradients; restored after
        for step in range(steps):
            weight = 10.0 * 100.0 ** (step / max(steps - 1, 1))
            m = _smooth(F.interpolate(torch.sigmoid(param), size=spatial, mode=mode, align_corners=False), stride / 2)
            evidence = m * x + (1 - m) * blurred
            log_p = torch.log_softmax(net(evidence).float(), 1).gather(1, label[:, None])[:, 0]
            regul = ((m.flatten(1).sort(1).values - target) ** 2).mean(1)
            loss = (-log_p + weight * regul).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return m.detach()
