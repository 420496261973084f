"""Speed benchmark: seconds per image, steps to a verified mask, decision kept and lesion IoU.

    python benchmarks/speed.py --preset cpu-small          # demo classifier, 96 px, CPU (minutes)
    python benchmarks/speed.py --preset cuda-224           # torchvision ResNet-18 trained here, 224 px, GPU

Prints one table (setting x batch size x s/image x median and longest steps x decision kept x lesion IoU)
with the device name, next to the straightforward baseline measured in the same run, and
writes it as JSON to ``--output``. Rows are printed as they finish, so a cut-off run keeps them.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.straightforward import explain_one  # noqa: E402
from monai_medcam import MedCAM  # noqa: E402
from monai_medcam.metrics import decision_kept, iou  # noqa: E402
from monai_medcam.demo import demo_classifier, make_known_evidence  # noqa: E402

PRESETS = {
    "smoke": dict(size=64, images=2, batches=(1, 2), baseline_images=1, baseline_steps=3, volume=32, train=0, steps=20),
    "cpu-small": dict(size=96, images=8, batches=(1, 8), baseline_images=1, baseline_steps=30, volume=32, train=0, steps=300),
    "cuda-224": dict(size=224, images=64, batches=(1, 32, 64), baseline_images=2, baseline_steps=300, volume=96, train=1600, steps=300),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_resnet18(size: int, count: int, device: torch.device) -> tuple[torch.nn.Module, float]:
    """torchvision ResNet-18 (no pretrained weights) trained on known-evidence fundus crops; returns test accuracy."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    train = make_known_evidence(count, size, seed=1)
    test = make_known_evidence(200, size, seed=2)
    net = resnet18(num_classes=2).to(device)
    x, y = torch.from_numpy(train.images).to(device), torch.from_numpy(train.labels).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(6):
        net.train()
        order = torch.randperm(count, device=device)
        for start in range(0, count - 31, 32):
            idx = order[start : start + 32]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        xt = torch.from_numpy(test.images).to(device)
        pred = torch.cat([net(xt[i : i + 64]).argmax(1) for i in range(0, len(xt), 64)]).cpu()
    return net, float((pred == torch.from_numpy(test.labels)).float().mean())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/speed.json"))
    parser.add_argument("--skip-3d", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    p = PRESETS[args.preset]
    device = torch.device("cuda" if args.preset.startswith("cuda") else "cpu")
    report: dict[str, object] = {"preset": args.preset, "device": device_name(device), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": []}
    print(f"device: {report['device']}, torch {torch.__version__}, preset {args.preset}", flush=True)

    if p["train"]:
        t0 = time.perf_counter()
        net, accuracy = train_resnet18(p["size"], p["train"], device)
        print(f"classifier: torchvision ResNet-18 trained here in {time.perf_counter() - t0:.0f} s, test accuracy {accuracy:.3f}", flush=True)
    else:
        net, accuracy = demo_classifier().to(device), float("nan")
        print("classifier: the committed demo classifier (MONAI ResNet-18, quarter width)", flush=True)
    report["classifier_accuracy"] = accuracy

    data = make_known_evidence(2 * p["images"] + 8, p["size"], seed=3)
    lesion = np.flatnonzero(data.labels == 1)[: p["images"]]
    x = torch.from_numpy(data.images[lesion]).to(device)
    truth = torch.from_numpy(data.lesion_masks[lesion]).to(device)

    # a batch runs until its longest image has finished: max steps (retries included) sets its time
    header = f"{'setting':<34} {'batch':>5} {'s/image':>9} {'steps(med)':>10} {'steps(max)':>10} {'verified':>8} {'kept':>6} {'area':>7} {'IoU':>6}"
    print(header, flush=True)

    def record(name: str, batch: int, seconds: float, steps: torch.Tensor, verified: float, kept: float, area: float, lesion_iou: float) -> None:
        median, longest = float(steps.float().median()), int(steps.max())
        row = dict(setting=name, batch=batch, s_per_image=seconds, median_steps=median, max_steps=longest, verified=verified, kept=kept,
                   area=area, iou=lesion_iou)
        report["rows"].append(row)
        print(f"{name:<34} {batch:>5} {seconds:>9.3f} {median:>10.0f} {longest:>10d} {verified:>8.2f} {kept:>6.2f} {area:>7.2%} {lesion_iou:>6.2f}",
              flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.output)

    # the straightforward baseline, batch 1, fixed steps
    masks, times = [], []
    for i in range(p["baseline_images"]):
        mask, seconds = explain_one(net, x[i : i + 1], steps=p["baseline_steps"])
        masks.append(mask)
        times.append(seconds)
    m = torch.cat(masks)
    n = len(masks)
    scale = 300 / p["baseline_steps"]
    with torch.no_grad():
        label = net(x[:n]).argmax(1)
    record(f"straightforward ({p['baseline_steps']} steps)", 1, float(np.mean(times)), torch.full((n,), p["baseline_steps"]), float("nan"),
           float(decision_kept(net, x[:n], m, label).float().mean()), float(m.mean()), float(iou(m, truth[:n]).mean()))
    if scale != 1:
        print(f"  (straightforward at 300 steps, extrapolated: {np.mean(times) * scale:.2f} s/image)", flush=True)

    settings = [("Med-CAM default", {}, p["batches"])]
    if device.type == "cuda":
        settings.append(("Med-CAM default, bf16 autocast", {"amp": True}, p["batches"][-1:]))
    for name, extra, batches in settings:
        for batch in batches:
            count = min(len(x), max(batch, 2 if batch == 1 else batch))
            MedCAM(net, steps=3, **extra).explain(x[:batch])  # warm-up (kernel selection, allocator)
            explainer = MedCAM(net, steps=p["steps"], **extra)
            sync(device)
            results = []
            t0 = time.perf_counter()
            for start in range(0, count, batch):
                results.append(explainer.explain(x[start : start + batch]))
            sync(device)
            seconds = (time.perf_counter() - t0) / count
            mask = torch.cat([r.mask.as_tensor() for r in results])
            label = torch.cat([r.label for r in results])
            record(f"{name}", batch, seconds, torch.cat([r.steps for r in results]),
                   float(torch.cat([r.verified for r in results]).float().mean()),
                   float(decision_kept(net, x[:count], mask, label).float().mean()), float(mask.mean()), float(iou(mask, truth[:count]).mean()))

    if not args.skip_3d:
        from monai.networks.nets import DenseNet121

        side = p["volume"]
        volume_net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).to(device).eval()
        volume = torch.rand(1, 1, side, side, side, generator=torch.Generator().manual_seed(0)).to(device)
        MedCAM(volume_net, steps=2).explain(volume)  # warm-up
        # times one attempt of up to 100 steps: a random-weight classifier's evidence is large by
        # nature, and restarts (for stalled masks) would time three attempts instead
        explainer = MedCAM(volume_net, steps=100, restarts=0)
        t0 = time.perf_counter()
        result = explainer.explain(volume)
        sync(device)
        record(f"3D DenseNet121 {side}^3 (random weights)", 1, time.perf_counter() - t0, result.steps,
               float(result.verified.float().mean()), float("nan"), float(result.area[0]), float("nan"))
    print(f"wrote {args.output}", flush=True)


if __name__ == "__main__":
    main()
