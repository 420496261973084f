"""Known-evidence quality benchmark: Med-CAM against Grad-CAM, Grad-CAM++ and occlusion, at equal area.

    python benchmarks/quality.py --preset cpu-small     # demo classifier, 96 px fundus crops, CPU

For lesion images whose lesion mask is known, every method's map is compared with the lesion:
saliency maps as binary masks holding the same fraction of pixels as Med-CAM's evidence (and
as the lesion), by IoU, decision kept on the binary evidence, decision kept under 8 random
backgrounds, energy inside the lesion and the pointing game. Writes a Markdown table and a
figure grid to ``--output`` (default ``docs/``), with the device and date.

This is the first architecture of the benchmark issue; the other architectures, backgrounds and
baselines are still to come.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_medcam import MedCAM, metrics  # noqa: E402
from monai_medcam.demo import demo_classifier, make_known_evidence  # noqa: E402
from monai_medcam.visualize import grad_cam, minmax_per_image, save_panels  # noqa: E402

PRESETS = {
    "smoke": dict(size=96, images=2, steps=20),
    "cpu-small": dict(size=96, images=8, steps=300),
}


def occlusion_maps(net: torch.nn.Module, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """MONAI occlusion sensitivity: the drop of the label's probability when a patch is occluded."""
    from monai.visualize import OcclusionSensitivity

    occ = OcclusionSensitivity(net, mask_size=12, n_batch=32, verbose=False)
    maps = []
    for i in range(len(x)):
        sens, _ = occ(x[i : i + 1])  # (1, classes, *spatial) in MONAI 1.6; older releases put classes last
        k = int(label[i])
        maps.append(-(sens[:, k : k + 1] if sens.ndim == x.ndim else sens[..., k].mean(1, keepdim=True)))
    return minmax_per_image(torch.cat(maps).detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--output", type=Path, default=Path("docs"))
    args = parser.parse_args()
    p = PRESETS[args.preset]
    net = demo_classifier()
    data = make_known_evidence(2 * p["images"] + 8, p["size"], seed=11)
    chosen = np.flatnonzero(data.labels == 1)[: p["images"]]
    x = torch.from_numpy(data.images[chosen])
    truth = torch.from_numpy(data.lesion_masks[chosen])

    t0 = time.perf_counter()
    result = MedCAM(net, steps=p["steps"]).explain(x)
    seconds = {"Med-CAM": (time.perf_counter() - t0) / len(x)}
    label, evidence = result.label, result.mask.as_tensor()
    saliency = {}
    for name, make in (
        ("Grad-CAM", lambda: grad_cam(net, x, "layer4", label)),
        ("Grad-CAM++", lambda: grad_cam(net, x, "layer4", label, plus_plus=True)),
        ("Occlusion", lambda: occlusion_maps(net, x, label)),
    ):
        t0 = time.perf_counter()
        saliency[name] = make()
        seconds[name] = (time.perf_counter() - t0) / len(x)

    rows = []

    def row(method: str, mask: torch.Tensor, raw: torch.Tensor) -> None:
        rows.append(
            (
                method,
                float(metrics.iou(mask, truth).mean()),
                float(metrics.decision_kept(net, x, mask, label).float().mean()),
                float(metrics.decision_kept_under_backgrounds(net, x, mask, label).mean()),
                float(metrics.area_fraction(mask).mean()),
                float(metrics.energy_in_truth(raw, truth).mean()),
                float(metrics.pointing_game(raw, truth).float().mean()),
                seconds[method.split(" @")[0]],
            )
        )

    row("Med-CAM", evidence, result.soft_mask)
    for name, sal in saliency.items():
        row(f"{name} @ Med-CAM area", metrics.binarize_top(sal, metrics.area_fraction(evidence)), sal)
        row(f"{name} @ lesion area", metrics.binarize_top(sal, metrics.area_fraction(truth)), sal)

    device = f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"Preset `{args.preset}`, {device}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}: the committed demo "
        f"classifier (MONAI ResNet-18, quarter width), {len(x)} fundus crops with a lesion ({p['size']} px, seed 11). "
        f"Med-CAM: verified {float(result.verified.float().mean()):.2f}, non-binary share of the soft mask "
        f"{float(metrics.non_binary_fraction(result.soft_mask).mean()):.4f}, median steps {float(result.steps.float().median()):.0f}.",
        "",
        "| method | lesion IoU | decision kept | kept under 8 backgrounds | area | energy in lesion | pointing game | s/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.2%} | {e:.2f} | {f:.2f} | {g:.3f} |" for m, a, b, c, d, e, f, g in rows]
    table = "\n".join(lines)
    print(table, flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    tmp = args.output / f".quality_{args.preset}.md.tmp"
    tmp.write_text(table + "\n")
    tmp.replace(args.output / f"quality_{args.preset}.md")
    show = min(4, len(x))
    save_panels(
        args.output / "images" / f"quality_{args.preset}.png",
        x[:show],
        {"lesion": truth[:show], "Med-CAM": evidence[:show], **{k: v[:show] for k, v in saliency.items()}},
        heatmaps=tuple(saliency),
    )
    print(f"wrote {args.output}/quality_{args.preset}.md and {args.output}/images/quality_{args.preset}.png")


if __name__ == "__main__":
    main()
