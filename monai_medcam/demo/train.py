"""Train the demo classifier on known-evidence fundus crops and save its weights.

    python -m monai_medcam.demo.train [--output PATH] [--epochs N]

Deterministic on CPU (fixed seeds); about two minutes on two cores. Reports test accuracy.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from monai_medcam.demo.classifier import DEMO_CHECKPOINT, DEMO_SIZE, build_demo_network
from monai_medcam.demo.known_evidence import make_known_evidence

logger = logging.getLogger(__name__)


def _data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    halves = [make_known_evidence(count // 2, DEMO_SIZE, "retina", lesion, seed=seed + k) for k, lesion in enumerate(("disc", "spots"))]
    images = torch.cat([torch.from_numpy(h.images) for h in halves])
    labels = torch.cat([torch.from_numpy(h.labels) for h in halves])
    return images, labels


def train(output: Path, epochs: int = 6, train_count: int = 2400, test_count: int = 400) -> float:
    """Train, save the state dict to ``output`` and return the test accuracy."""
    torch.manual_seed(0)
    x_train, y_train = _data(train_count, seed=0)
    x_test, y_test = _data(test_count, seed=10_000)
    network = build_demo_network()
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
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    torch.save(network.state_dict(), tmp)
    tmp.replace(output)
    return accuracy


@torch.no_grad()
def evaluate(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    network.eval()
    predictions = torch.cat([network(images[i : i + 64]).argmax(1) for i in range(0, len(images), 64)])
    return (predictions == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    accuracy = train(args.output, args.epochs)
    logger.info("saved %s (test accuracy %.3f)", args.output, accuracy)


if __name__ == "__main__":
    main()
