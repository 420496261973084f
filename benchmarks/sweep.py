"""Tune Med-CAM's settings on the known-evidence benchmark, away from the images it reports.

    python benchmarks/sweep.py --archs resnet18 mobilenet_v2 --setting "" --setting "area_weight=40"
    python benchmarks/sweep.py --setting "" --setting "restarts=0" --seeds 0 1 2

Each ``--setting`` is one row: comma-separated ``name=value`` pairs of :class:`MedCAMSettings`
(``""``: the defaults). The classifiers are those of ``benchmarks/quality.py`` (its cache; trained
there if missing). The lesion images come from their own seed (``TUNE_SEED``), not from the images
``quality.py`` reports, so settings chosen here are judged there on images they were not chosen on;
``--images`` per architecture, spread over the background and lesion kinds, classified right
(where the classifier gets enough right: the cached ``cpu-small`` ones all do).

Prints a markdown table, one row per (architecture, setting): Med-CAM's mean lesion IoU, energy in
the lesion (soft mask), non-binary share, area, decision kept, kept under 8 random backgrounds,
median steps, share of masks settled, seconds per image and the share kept under ``--fresh`` (64)
further backgrounds; and the rows of every architecture averaged per setting. Eight backgrounds
tell little about a mask that fails one draw in thirty (docs/settings.md, "Volumes under fresh
backgrounds"): the last column draws more, from a seed of its own (``FRESH_SEED``), so robustness
can be compared between settings.

Med-CAM's optimisation is chaotic: another ``seed`` (or batch size, or a rounding) moves one
image's mask a lot, and 12 images' mean IoU per architecture by up to 0.13 (docs/settings.md). A
difference between two settings means something only where it is larger than the spread over
seeds: ``--seeds`` runs every setting with each seed and, given two or more, ends with a table
of the means over the seeds and their range. ``--reported`` runs on the images ``quality.py``
reports (the preset's count) instead of the tuning images, to see how far its figures move with
the seed; never choose settings there. ``--reported --images N`` runs on the images of
``quality.py --images N``.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import ARCHS, EXPLAINED_SEED, PRESETS, TUNE_IMAGES, TUNE_SEED, mask_metrics, trained, tuning_images  # noqa: E402
from monai_medcam import MedCAM, metrics  # noqa: E402

COLUMNS = ("iou", "energy", "non_binary", "area", "kept", "kept_backgrounds", "median_steps", "settled", "s_per_image", "kept_fresh")
FRESH_SEED = 1000  # the --fresh backgrounds: neither the verification's (verify_seed) nor the benchmark's (0)


def _pairs(text: str) -> list[str]:
    """``"a=1, b=(2, 3)"`` -> ``["a=1", "b=(2, 3)"]``: split at the commas outside brackets."""
    pairs, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            pairs.append(text[start:i].strip())
            start = i + 1
    return [pair for pair in pairs if pair]


def parse_setting(text: str) -> dict:
    """``"area_weight=40,baseline=blur"`` -> ``{"area_weight": 40, "baseline": "blur"}``: Python literals, else strings."""
    out = {}
    for pair in _pairs(text):
        name, sep, value = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"setting {pair!r} is not name=value.")
        try:
            out[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):  # a bare word: a string setting such as baseline=blur
            out[name.strip()] = value.strip()
    return out


def run(net: torch.nn.Module, x: torch.Tensor, truth: torch.Tensor, setting: dict, steps: int, fresh: int = 64) -> dict:
    """Med-CAM with ``setting`` on ``x``; its mean metrics, and the share kept under ``fresh`` backgrounds."""
    t0 = time.perf_counter()
    result = MedCAM(net, **{"steps": steps, **setting}).explain(x)
    seconds = time.perf_counter() - t0
    mask = result.mask.as_tensor()
    kept_fresh = metrics.decision_kept_under_backgrounds(net, x, mask, result.label, k=fresh, seed=FRESH_SEED)  # no gradients: metrics' own
    return dict(
        **mask_metrics(net, x, mask, result.soft_mask, truth, result.label),
        kept_fresh=float(kept_fresh.mean()),
        non_binary=float(metrics.non_binary_fraction(result.soft_mask).mean()),
        settled=float(result.settled.float().mean()),
        median_steps=float(result.steps.float().median()),
        s_per_image=seconds / len(x),
    )


def _row(name: str, setting: str, r: dict) -> str:
    return (f"| {name} | `{setting or 'defaults'}` | {r['iou']:.2f} | {r['energy']:.2f} | {r['non_binary']:.1%} | {r['area']:.1%} "
            f"| {r['kept']:.2f} | {r['kept_backgrounds']:.2f} | {r['median_steps']:.0f} | {r['settled']:.2f} | {r['s_per_image']:.1f} "
            f"| {r['kept_fresh']:.3f} |")


def _with_seed(text: str, seed: int) -> str:
    """The setting ``text``, as written, with ``seed=seed`` in place of any seed it gives."""
    return ", ".join([*(pair for pair in _pairs(text) if pair.partition("=")[0].strip() != "seed"), f"seed={seed}"])


def _spread_row(name: str, setting: str, per_seed: list[dict]) -> str:
    def cell(column: str, percent: bool = False, digits: int = 2) -> str:
        values = [r[column] for r in per_seed]
        fmt = "{:.1%}" if percent else f"{{:.{digits}f}}"
        return f"{fmt.format(np.mean(values))} ({fmt.format(min(values))} to {fmt.format(max(values))})"

    return (f"| {name} | `{setting or 'defaults'}` | {cell('iou')} | {cell('energy')} | {cell('non_binary', True)} | {cell('area', True)} "
            f"| {cell('kept_backgrounds')} | {np.mean([r['s_per_image'] for r in per_seed]):.1f} | {cell('kept_fresh', digits=3)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=[a for a in ARCHS if not a.endswith("_3d")])
    parser.add_argument("--setting", action="append", default=None, help='one row, e.g. "area_weight=40,lr_decay=0.98"; repeat')
    parser.add_argument("--images", type=int, default=None,
                        help=f"lesion images per architecture (default {TUNE_IMAGES}; with --reported the preset's, "
                             "or those of quality.py --images N)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run every setting with each of these Med-CAM seeds (overriding a seed= in the setting)")
    parser.add_argument("--fresh", type=int, default=64, help="backgrounds of the last column, kept under fresh backgrounds (default 64)")
    parser.add_argument("--reported", action="store_true", help="the images quality.py reports, not the tuning images")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="classifier cache of quality.py")
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    count = args.images or (p["images"] if args.reported else TUNE_IMAGES)
    if args.fresh < 1:
        parser.error(f"--fresh must be at least 1 background, got {args.fresh}.")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}.")
    device = torch.device(p["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset} needs a CUDA GPU; none is visible.")
    bases = args.setting if args.setting is not None else [""]
    seeded = {base: [_with_seed(base, k) for k in args.seeds] if args.seeds else [base] for base in bases}
    texts = [text for group in seeded.values() for text in group]
    if len(set(texts)) != len(texts):
        parser.error(f"two settings are the same row once the seeds are set: {texts}.")
    settings = {text: parse_setting(text) for text in texts}
    print(f"| architecture | setting | IoU | energy | non-binary | area | kept | kept under bg | median steps | settled | s/image "
          f"| kept under {args.fresh} fresh bg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    totals: dict[str, list[dict]] = {text: [] for text in texts}
    for arch in args.archs:
        net, *_ = trained(arch, p, args.preset, device, args.results / "models", retrain=False)
        x, truth = tuning_images(arch, p, net, count, device, EXPLAINED_SEED if args.reported else TUNE_SEED)
        for text, setting in settings.items():
            r = run(net, x, truth, setting, p["steps"], args.fresh)
            totals[text].append(r)
            print(_row(arch, text, r), flush=True)
    if len(args.archs) > 1:  # each setting's rows averaged over the architectures, a last "architecture"
        names = [*args.archs, "mean"]
        for text, rows in totals.items():
            rows.append({c: float(np.mean([r[c] for r in rows])) for c in COLUMNS})
            print(_row("mean", text, rows[-1]), flush=True)
    else:
        names = list(args.archs)
    if args.seeds and len(args.seeds) > 1:
        print(f"\nOver seeds {', '.join(map(str, args.seeds))}: the mean, and the range of the per-seed values\n")
        print(f"| architecture | setting | IoU | energy | non-binary | area | kept under bg | s/image | kept under {args.fresh} fresh bg |")
        print("|---|---|---|---|---|---|---|---|---|")
        for base, group in seeded.items():
            for a, name in enumerate(names):
                print(_spread_row(name, base, [totals[text][a] for text in group]), flush=True)


if __name__ == "__main__":
    main()
