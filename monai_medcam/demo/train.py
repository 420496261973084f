"""Train a demo classifier on known-evidence crops and save its weights.

    python -m monai_medcam.demo.train [--kind fundus|radiology|histology] [--output PATH] [--epochs N]

``fundus``: RGB fundus crops at 96 px; ``radiology``: grayscale MR, CT, CR and ultrasound images
(pydicom-data, nibabel) at 64 px, half of them crops and half whole images, half with regions
removed; ``histology``: RGB tiles of scikit-image's IHC section at 64 px. Deterministic on CPU
(fixed seeds); two to three minutes on two cores (radiology: about five). Reports test accuracy.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from monai_medcam.backgrounds import random_background
from monai_medcam.demo.classifier import (
    DEMO_CHECKPOINT,
    DEMO_SIZE,
    HISTOLOGY_CHECKPOINT,
    HISTOLOGY_SIZE,
    RADIOLOGY_CHECKPOINT,
    RADIOLOGY_SIZE,
    build_demo_network,
    build_histology_network,
    build_radiology_network,
)
from monai_medcam.demo.known_evidence import make_known_evidence
from monai_medcam.writers import atomic_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How one demo classifier is made.

    Attributes:
        checkpoint: where its weights are saved (the committed file).
        size: input side in pixels.
        background: :func:`~monai_medcam.demo.known_evidence.make_known_evidence`'s background.
        channels: 3 (RGB) or 1 (grayscale).
        network: builds the untrained network.
        lesions: the lesion kinds of the two halves of the training set.
        epochs, train_count: the schedule and the number of training images.
        whole_share: share of training images that are a whole background image squeezed to
            ``size`` (as the radiology pipeline feeds whole studies), the others random crops.
        removals: share of training images with regions removed (:func:`with_removals`), so that
            the lesion is the classifier's evidence under removal too.
    """

    checkpoint: Path
    size: int
    background: str
    channels: int
    network: Callable[[], torch.nn.Module]
    lesions: tuple[str, str]
    epochs: int = 6
    train_count: int = 2400
    whole_share: float = 0.0
    removals: float = 0.0


KINDS = {
    "fundus": Recipe(DEMO_CHECKPOINT, DEMO_SIZE, "retina", 3, build_demo_network, ("disc", "spots")),
    # whole studies, not only crops, and removals: without them the classifier decided most of the
    # demo studies from something other than the lesion (docs/radiology.md)
    "radiology": Recipe(RADIOLOGY_CHECKPOINT, RADIOLOGY_SIZE, "radiology", 1, build_radiology_network, ("disc", "disc"),
                        epochs=16, train_count=6000, whole_share=0.5, removals=0.5),
    "histology": Recipe(HISTOLOGY_CHECKPOINT, HISTOLOGY_SIZE, "ihc", 3, build_histology_network, ("disc", "spots")),
}


def _data(count: int, seed: int, kind: str = "fundus") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` images of ``kind``'s recipe, half of each lesion kind: images, labels and lesion masks."""
    r = KINDS[kind]
    halves = [
        make_known_evidence(count // 2, r.size, r.background, lesion, r.channels, seed=seed + k, whole_share=r.whole_share)
        for k, lesion in enumerate(r.lesions)
    ]
    return tuple(torch.cat([torch.from_numpy(getattr(h, name)) for h in halves]) for name in ("images", "labels", "lesion_masks"))


def with_removals(
    images: torch.Tensor, labels: torch.Tensor, lesions: torch.Tensor, share: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of ``images`` ``(N, C, *spatial)`` and ``labels`` where ``share`` of the images have
    regions removed as the explanations and the metrics remove them (zeros, or Gaussian or uniform
    noise as Med-CAM's random backgrounds): either 1-2 balls (radius 8-38% of the side), or
    everything outside 1-3 such balls, one of them the lesion itself for half the lesion images. An
    image that keeps at least 90% of its lesion keeps its label; one that keeps at most 10% becomes
    class 0; one in between stays whole. The lesion is then the classifier's evidence under removal
    too: trained on whole volumes only, the 3D classifier still said "lesion" on most volumes whose
    lesion was zeroed, so no removal-based explanation could have been the lesion."""
    g = torch.Generator().manual_seed(seed)
    out, out_labels = images.clone(), labels.clone()
    spatial = images.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in spatial], indexing="ij"))
    scale = torch.tensor(spatial, dtype=torch.float32)

    def ball(centre: torch.Tensor, radius: float) -> torch.Tensor:
        return (grid - centre.view(-1, *[1] * len(spatial))).pow(2).sum(0) <= radius**2

    for i in torch.randperm(len(images), generator=g)[: int(share * len(images))].tolist():
        keep_inside = bool(torch.rand(1, generator=g) < 0.5)
        balls = torch.zeros(spatial, dtype=torch.bool)
        lesion = lesions[i, 0] > 0
        for _ in range(1 + int(torch.randint(3 if keep_inside else 2, (1,), generator=g))):
            centre = torch.rand(len(spatial), generator=g) * scale
            balls |= ball(centre, float(0.08 + 0.3 * torch.rand(1, generator=g)) * min(spatial))
        if keep_inside and lesion.any() and bool(torch.rand(1, generator=g) < 0.5):  # the lesion, a little dilated:
            # a ball at its centre with its volume (4.19 ~ 4 pi / 3) or area (3.14 ~ pi), radius plus 0-2
            centre = (grid * lesion).flatten(1).sum(1) / lesion.sum()
            radius = (lesion.sum().item() / (4.19 if len(spatial) == 3 else 3.14)) ** (1 / len(spatial)) + 2 * float(torch.rand(1, generator=g))
            balls |= ball(centre, radius)
        keep = balls if keep_inside else ~balls
        kept = float(keep[lesion].float().mean()) if lesion.any() else 1.0
        if 0.1 < kept < 0.9:
            continue
        kind = ("zeros", "zeros", "gaussian", "uniform")[int(torch.randint(4, (1,), generator=g))]
        fill = random_background(images[i : i + 1], kind, g)[0]
        out[i] = torch.where(keep, images[i], fill)
        if kept <= 0.1:
            out_labels[i] = 0
    return out, out_labels


def fit(
    network: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    max_lr: float,
    weight_decay: float,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
    channels_last: bool = False,
    batch_size: int = 32,
) -> torch.nn.Module:
    """Train ``network`` on ``images`` ``(N, C, *spatial)`` and ``labels`` ``(N,)``: AdamW with a
    one-cycle schedule peaking at ``max_lr``, full batches of ``batch_size`` (a last partial one is
    left out), each batch mirrored with probability 1/2. ``on_epoch(epoch, last_loss)`` is called
    after each epoch. ``channels_last``: train a 2D network in channels-last memory format (faster
    for some networks on CPU; the benchmark's ``CHANNELS_LAST`` says which). Returns the network,
    in train mode and the default memory format."""
    if channels_last and images.ndim != 4:
        raise ValueError(f"channels_last needs 2D images (N, C, H, W); got images of shape {tuple(images.shape)}.")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(device, memory_format=layout)
    batches = len(images) // batch_size
    if batches == 0:
        raise ValueError(f"fit needs at least one batch of {batch_size} images; got {len(images)}.")
    optimizer = torch.optim.AdamW(network.parameters(), lr=max_lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(1, epochs * batches))
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(images))
        for b in range(batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            batch = images[idx].to(device).contiguous(memory_format=layout)
            if torch.rand(1).item() < 0.5:
                batch = batch.flip(-1)
            loss = F.cross_entropy(network(batch), labels[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if on_epoch is not None:
            on_epoch(epoch, loss.item())
    return network.to(memory_format=torch.contiguous_format)


def train(output: Path, kind: str = "fundus", epochs: int | None = None, test_count: int = 400) -> float:
    """Train ``kind``'s recipe (``epochs`` overrides its own), save the state dict to ``output`` and
    return the test accuracy (on whole images, as the recipe makes them)."""
    r = KINDS[kind]
    torch.manual_seed(0)
    x_train, y_train, lesions = _data(r.train_count, seed=0, kind=kind)
    x_test, y_test, _ = _data(test_count, seed=10_000, kind=kind)
    if r.removals:
        x_train, y_train = with_removals(x_train, y_train, lesions, r.removals, seed=101)
    network = r.network()

    accuracies: list[float] = []

    def report(epoch: int, loss: float) -> None:
        accuracies.append(evaluate(network, x_test, y_test))
        logger.info("epoch %d: loss %.3f, test accuracy %.3f", epoch + 1, loss, accuracies[-1])

    fit(network, x_train, y_train, epochs or r.epochs, max_lr=3e-3, weight_decay=1e-4, on_epoch=report)
    with atomic_path(output) as tmp:
        torch.save(network.state_dict(), tmp)
    return accuracies[-1]


@torch.no_grad()
def evaluate(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    network.eval()
    predictions = torch.cat([network(images[i : i + 64]).argmax(1) for i in range(0, len(images), 64)])
    return (predictions == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(KINDS), default="fundus")
    parser.add_argument("--output", type=Path, help="default: the committed checkpoint of --kind")
    parser.add_argument("--epochs", type=int, help="default: the recipe's (16 for radiology, 6 otherwise)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = args.output or KINDS[args.kind].checkpoint
    accuracy = train(output, args.kind, args.epochs)
    logger.info("saved %s (test accuracy %.3f)", output, accuracy)


if __name__ == "__main__":
    main()
