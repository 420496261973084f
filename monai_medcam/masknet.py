"""The mask network: B independent MONAI ``BasicUNet``s, one per image, evaluated together.

Each image gets its own U-Net, trained from scratch on that image alone. The B networks share
their initial weights (drawn from the seed, so an image's result does not depend on its place in
the batch) and are evaluated in one pass with ``torch.func.vmap`` over stacked parameters; the
per-image convolutions become grouped convolutions, so the batch costs about what one larger
network costs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from torch.func import functional_call, stack_module_state, vmap

__all__ = ["StackedMaskNet", "pad_to_multiple"]

_MULTIPLE = 16  # BasicUNet halves the size four times


def pad_to_multiple(x: torch.Tensor, multiple: int = _MULTIPLE) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial sides of ``x`` ``(B, C, *spatial)`` up to a multiple (and at least twice it), with edge values.

    BasicUNet halves each side four times and normalises per instance, so every side must be a
    multiple of 16 and the bottleneck needs more than one element. Returns the padded tensor and
    the slices that crop a padded output back to ``x``'s size.
    """
    spatial = x.shape[2:]
    extras = [max(2 * multiple, size + (-size) % multiple) - size for size in spatial]
    pads: list[int] = []
    for extra in reversed(extras):
        pads += [extra // 2, extra - extra // 2]
    crop = [slice(None), slice(None)]
    for size, extra in zip(spatial, extras):
        crop.append(slice(extra // 2, extra // 2 + size))
    if any(pads):
        x = F.pad(x, pads, mode="replicate")
    return x, tuple(crop)


_DEFAULT_DTYPE = threading.Lock()


def _float32(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` in float32 (as under the default dtype), whatever ``torch.set_default_dtype`` says:
    the evidence is float32, and the same seed gives the same networks."""
    if torch.get_default_dtype() == torch.float32:
        return build()
    with _DEFAULT_DTYPE:  # the default is the process's: one switch at a time
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            return build()
        finally:
            torch.set_default_dtype(default)


class StackedMaskNet(nn.Module):
    """``count`` independent BasicUNets mapping images to mask logits.

    Args:
        count: number of independent networks (the batch size B).
        spatial_dims: 2 or 3.
        in_channels: image channels C.
        features: BasicUNet's six feature sizes.
        init_keep: initial mask value everywhere (the final bias is set to its logit), so the
            optimisation starts from "keep everything" and prunes.
        seed: seeds the shared initial weights.
        device: where the networks live.

    ``forward(x)``: ``x`` ``(B, C, *spatial)`` with sides multiples of 16 -> logits ``(B, 1, *spatial)``.
    """

    def __init__(
        self,
        count: int,
        spatial_dims: int,
        in_channels: int,
        features: Sequence[int] = (16, 16, 32, 64, 128, 16),
        init_keep: float = 0.9,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
            torch.default_generator.manual_seed(seed)  # the CPU's alone (the network is built there): GPUs' states untouched
            base = _float32(lambda: BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1,
                                              features=tuple(features)))
        init_keep = min(max(init_keep, 1e-3), 1 - 1e-3)
        with torch.no_grad():
            base.final_conv.bias.fill_(math.log(init_keep / (1 - init_keep)))
        for module in base.modules():  # BasicUNet's in-place LeakyReLU does not mix with vmap + autograd
            if hasattr(module, "inplace"):
                module.inplace = False
        base = base.to(device)
        params, buffers = stack_module_state([base] * count)
        self.names = list(params)
        self.weights = nn.ParameterList([nn.Parameter(params[n]) for n in self.names])
        self.buffer_dict = buffers
        self._template = [copy.deepcopy(base).to("meta")]  # a list keeps it out of .parameters() and .to()

    def _one(self, weights: tuple[torch.Tensor, ...], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._template[0], (dict(zip(self.names, weights)), buffers), (x[None],))[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.weights[0]):
            raise ValueError(f"expected {len(self.weights[0])} images, got {x.shape[0]}.")
        return vmap(self._one)(tuple(self.weights), self.buffer_dict, x)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the networks at ``index`` (drop the finished explainers)."""
        for i, w in enumerate(self.weights):
            self.weights[i] = nn.Parameter(w.detach()[index])
        self.buffer_dict = {k: v[index] for k, v in self.buffer_dict.items()}
