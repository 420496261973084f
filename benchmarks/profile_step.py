"""Where a Med-CAM step spends its time: torch.profiler over a fixed number of steps.

    python benchmarks/profile_step.py --device cuda --size 224 --batch 1 64 --steps 20

Uses a randomly initialised torchvision ResNet-18 (timing only; the weights do not change the
work per step), no early stop, and prints the top operators by device time and by host time,
plus the wall time per step, for each batch size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_medcam import MedCAM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cudnn-benchmark", action="store_true")
    args = parser.parse_args()
    from torchvision.models import resnet18

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    net = resnet18(num_classes=2).to(device).eval()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for batch in args.batch:
        x = torch.rand(batch, 3, args.size, args.size, device=device)
        settings = dict(steps=args.steps, min_steps=10_000, check_every=10, max_retries=0)
        MedCAM(net, **{**settings, "steps": 3}).explain(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        MedCAM(net, **settings).explain(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - t0) / args.steps
        print(f"\n=== batch {batch}: {per_step * 1000:.1f} ms/step wall ({per_step / batch * 1000:.2f} ms/step/image) ===", flush=True)
        with torch.profiler.profile(activities=activities) as prof:
            MedCAM(net, **settings).explain(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60), flush=True)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
