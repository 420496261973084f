"""Train a demo classifier on known-evidence crops and save its weights.

    python -m monai_medcam.demo.train [--kind fundus|radiology|histology] [--output PATH] [--epochs N]

``fundus``: RGB fundus crops at 96 px; ``radiology``: grayscale crops of MR, CT, CR, ultrasound
(pydicom-data, nibabel) at 64 px; ``histology``: RGB tiles of scikit-image's IHC section at 64 px. Deterministic on CPU (fixed seeds); two to three minutes on two
cores. Reports test accuracy.
"""

from __future__ import annotations

import argparse
import logging
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


def train(output: Path, epochs: int = 6, train_count: int = 2400, test_count: int = 400, kind: str = "fundus") -> float:
    """Train, save the state dict to ``output`` and return the test accuracy."""
    torch.manual_seed(0)
    x_train, y_train = _data(train_count, seed=0, kind=kind)
    x_test, y_test = _data(test_count, seed=10_000, kind=kind)
    network = KINDS[kind][4]()
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * (train_count // 32))
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(train_count)
        for start in range(0, train_count - 31, 32):
            idx = order[start : start + 32]
            batch = x_train[idx]
            if torch.rand(1).item() < 0.5:
                batch = batch.flip(-1)
            loss = F.cross_entropy(network(batch), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        accuracy = evaluate(network, x_test, y_test)
        logger.info("epoch %d: loss %.3f, test accuracy %.3f", epoch + 1, loss.item(), accuracy)
    with atomic_path(output) as tmp:
        torch.save(network.state_dict(), tmp)
    return accuracy


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
