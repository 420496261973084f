"""The straightforward Med-CAM the speed figures are compared with (method-notes.md).

One image at a time, one MONAI BasicUNet with its default features, Adam at a fixed learning
rate for a fixed number of steps, no early stop, no batching: what a first implementation of the
paper looks like. Used only by ``speed.py`` as the baseline measured in the same run.
"""

from __future__ import annotations

import contextlib
import io
import time

import torch
from monai.networks.nets import BasicUNet

from monai_medcam.backgrounds import random_background
from monai_medcam.classifiers import FrozenClassifier
from monai_medcam.losses import (
    ActivationMatchingLoss,
    AreaLoss,
    BinarizationLoss,
    DecisionLoss,
    OutputKLLoss,
    TotalVariationLoss,
    straight_through_binary,
)
from monai_medcam.masknet import pad_to_multiple


def explain_one(classifier: torch.nn.Module, x: torch.Tensor, steps: int = 300, lr: float = 3e-3) -> tuple[torch.Tensor, float]:
    """Binary mask ``(1, 1, *spatial)`` for one image ``(1, C, *spatial)`` and the seconds it took."""
    start = time.perf_counter()
    frozen = FrozenClassifier(classifier, "auto")
    with frozen.frozen(), torch.enable_grad():
        with torch.no_grad():
            ref_logits, ref_acts = frozen.logits_and_activations(x)
        label = ref_logits.argmax(1)
        with contextlib.redirect_stdout(io.StringIO()):
            net = BasicUNet(spatial_dims=x.ndim - 2, in_channels=x.shape[1], out_channels=1).to(x.device)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        padded, crop = pad_to_multiple(x)
        generator = torch.Generator(device=x.device).manual_seed(0)
        act, kl, ce = ActivationMatchingLoss(frozen.layers), OutputKLLoss(2.0), DecisionLoss()
        area, crisp, tv = AreaLoss(), BinarizationLoss(), TotalVariationLoss()
        for _ in range(steps):
            soft = torch.sigmoid(net(padded)[crop])
            hard = straight_through_binary(soft)
            logits_e, acts_e = frozen.logits_and_activations(hard * x)
            logits_r = frozen.logits(hard * x + (1 - hard) * random_background(x, "gaussian", generator))
            loss = (
                10 * act(ref_acts, acts_e) + 5 * kl(ref_logits, logits_e) + 15 * ce(logits_e, label)
                + 20 * area(soft) + 2 * crisp(soft) + 20 * tv(soft) + 10 * ce(logits_r, label)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        mask = (soft.detach() > 0.5).float()
    if x.is_cuda:
        torch.cuda.synchronize()
    return mask, time.perf_counter() - start
