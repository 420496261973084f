"""Train a demo classifier on known-evidence crops and save its weights.

    python -m monai_medcam.demo.train [--kind fundus|radiology|histology] [--output PATH] [--epochs N]

``fundus``: RGB fundus crops at 96 px; ``radiology``: grayscale crops of MR, CT, CR, ultrasound
(pydicom-data, nibabel) at 64 px; ``histology``: RGB tiles of scikit-image's IHC section at 64 px. Deterministic on CPU (fixed seeds); two to three minutes on two
cores. Reports test accuracy.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

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


# kind -> (checkpoint, size, background, channels, network, lesion kinds)
KINDS = {
    "fundus": (DEMO_CHECKPOINT, DEMO_SIZE, "retina", 3, build_demo_network, ("disc", "spots")),
    "radiology": (RADIOLOGY_CHECKPOINT, RADIOLOGY_SIZE, "radiology", 1, build_radiology_network, ("disc", "disc")),
    "histology": (HISTOLOGY_CHECKPOINT, HISTOLOGY_SIZE, "ihc", 3, build_histology_network, ("disc", "spots")),
}


def _data(count: int, seed: int, kind: str = "fundus") -> tuple[torch.Tensor, torch.Tensor]:
    _, size, background, channels, _, lesions = KINDS[kind]
    halves = [
        make_known_evidence(count // 2, size, background, lesion, channels, seed=seed + k)
        for k, lesion in enumerate(lesions)
    ]
    images = torch.cat([torch.from_numpy(h.images) for h in halves])
    labels = torch.cat([torch.from_numpy(h.labels) for h in halves])
    return images, labels


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
) -> torch.nn.Module:
    """Train ``network`` on ``images`` ``(N, C, *spatial)`` and ``labels`` ``(N,)``: AdamW with a
    one-cycle schedule peaking at ``max_lr``, batches of 32, each batch mirrored with probability
    1/2. ``on_epoch(epoch, last_loss)`` is called after each epoch. ``channels_last``: train a 2D
    network in channels-last memory format (faster for some networks on CPU; the benchmark's
    ``CHANNELS_LAST`` says which). Returns the network, in train mode and the default memory format."""
    if channels_last and images.ndim != 4:
        raise ValueError(f"channels_last needs 2D images (N, C, H, W); got images of shape {tuple(images.shape)}.")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(device, memory_format=layout)
    batches = len(images) // 32
    optimizer = torch.optim.AdamW(network.parameters(), lr=max_lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(1, epochs * batches))
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(images))
        for b in range(batches):
            idx = order[b * 32 : (b + 1) * 32]
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


def train(output: Path, epochs: int = 6, train_count: int = 2400, test_count: int = 400, kind: str = "fundus") -> float:
    """Train, save the state dict to ``output`` and return the test accuracy."""
    torch.manual_seed(0)
    x_train, y_train = _data(train_count, seed=0, kind=kind)
    x_test, y_test = _data(test_count, seed=10_000, kind=kind)
    network = KINDS[kind][4]()

    accuracies: list[float] = []

    def report(epoch: int, loss: float) -> None:
        accuracies.append(evaluate(network, x_test, y_test))
        logger.info("epoch %d: loss %.3f, test accuracy %.3f", epoch + 1, loss, accuracies[-1])

    fit(network, x_train, y_train, epochs, max_lr=3e-3, weight_decay=1e-4, on_epoch=report)
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
    parser.add_argument("--epochs", type=int, help="default: 10 for radiology, 6 otherwise")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = args.output or KINDS[args.kind][0]
    epochs = args.epochs or (10 if args.kind == "radiology" else 6)
    accuracy = train(output, epochs, kind=args.kind)
    logger.info("saved %s (test accuracy %.3f)", output, accuracy)


if __name__ == "__main__":
    main()
