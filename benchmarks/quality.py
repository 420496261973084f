"""Known-evidence quality benchmark: Med-CAM against Grad-CAM, Grad-CAM++, occlusion and extremal perturbation.

    python benchmarks/quality.py --preset cpu-small    # 64 px, 32^3 volumes, reduced-width models, 2 CPU cores
    python benchmarks/quality.py --preset cuda-224     # 224 px, 96^3 volumes, full-size models, one GPU
    python benchmarks/quality.py --preset cuda-224 --dry-run   # the same models and sizes, a few images and steps, CPU

For each architecture (torchvision ResNet-18, MobileNet-V2, ConvNeXt, ViT; MONAI DenseNet121 on
3D volumes) the benchmark trains a classifier from scratch on known-evidence images (real
backgrounds: scikit-image's fundus and IHC, pydicom-data's MR, CT, CR and ultrasound, nibabel's
MRI; synthetic lesions whose exact masks are known; distractor rings in both classes), reports
its test accuracy, then explains lesion images it classifies correctly with every method. Grad-CAM
runs at its usual layer and at its best layer on the tuning images (``best_grad_cam_layer``). Saliency
maps become binary masks holding the same fraction of pixels as Med-CAM's evidence, and as the
lesion; all metrics come from ``monai_medcam.metrics``.

Writes ``quality_<preset>.md`` (a table per architecture, device and date) and
``images/quality_<preset>_<arch>.png`` (image | lesion | Med-CAM | the saliency maps) to
``--output`` (default ``docs/``), and the numbers as JSON to ``--results`` (default
``benchmarks/results/``). Trained classifiers are cached in its ``models/`` folder (state dicts,
loaded with ``weights_only=True``; ``--retrain`` trains again).

``--images N`` explains N lesion images per architecture instead of the preset's, with its cached
classifiers, reported as ``quality_<preset>-<N>images``: a larger sample for the verdict against
the targets. Each section gives Med-CAM's means with their 95% bootstrap intervals over the images.

``--dry-run`` runs a preset's image sizes and models on the CPU with a few images, one epoch and
three Med-CAM steps (``DRY_RUN``), reported as ``quality_<preset>-dry`` under ``--results`` unless
``--output`` is given (not ``docs/``): every code path of a GPU run, checked before device time is
spent on it; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import sys
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import extremal_perturbation, grad_cam_layers, grad_cams, occlusion  # noqa: E402
from monai_medcam import MedCAM, metrics  # noqa: E402
from monai_medcam.demo.known_evidence import make_known_evidence, make_known_evidence_3d  # noqa: E402
from monai_medcam.demo.train import fit, with_removals  # noqa: E402
from monai_medcam.visualize import grad_cam, save_panels  # noqa: E402
from monai_medcam.writers import atomic_path  # noqa: E402

ARCHS = ("resnet18", "mobilenet_v2", "convnext", "vit", "densenet121_3d")
PRESETS = {
    # CI: every code path, tiny training, ranges only
    "smoke": dict(size=32, volume=32, archs=("mobilenet_v2", "vit", "densenet121_3d"), train=96, train_3d=32, test=24, epoch_scale=0,
                  images=2, tune_images=2, steps=10, extremal_steps=5, auc_steps=4, small=True, device="cpu"),
    "cpu-small": dict(size=64, volume=32, archs=ARCHS, train=1800, train_3d=1200, test=300, epoch_scale=1, images=6, steps=300,
                      extremal_steps=100, auc_steps=16, small=True, device="cpu"),
    "cuda-224": dict(size=224, volume=96, archs=ARCHS, train=3600, train_3d=800, test=300, epoch_scale=1, images=32, steps=300,
                     extremal_steps=150, auc_steps=32, small=False, device="cuda"),
}
# --dry-run: a preset's image sizes and models with this little work, on the CPU, before a GPU run
# (training batches of 4: 32 volumes of 96^3 at once would not fit a CPU machine's memory)
DRY_RUN = dict(train=48, train_3d=8, batch=4, test=16, epoch_scale=0, images=2, tune_images=2, steps=3, extremal_steps=3, auc_steps=4, device="cpu")
# per architecture: AdamW's peak learning rate (one-cycle schedule) and epochs, found on cpu-small;
# the layer-normalised models (ConvNeXt, ViT) stay at chance with 1e-3 and need standardised inputs.
# ResNet-18 6 -> 4 and MobileNet-V2 12 -> 8 epochs in session 10, for time: same test accuracy
RECIPES = {"resnet18": (1e-3, 4), "mobilenet_v2": (3e-3, 8), "convnext": (5e-4, 24), "vit": (3e-4, 6), "densenet121_3d": (1e-3, 12)}
# per architecture: share of training images with regions removed (with_removals); the 2D classifiers
# pass the evidence checks without it, the 3D one does not (docs/benchmark.md)
REMOVALS = {"densenet121_3d": 0.5}
# trained in channels-last memory format on CPU: 27-29% faster there for these two (depthwise
# convolutions), slower for ResNet-18, 9% faster for the 3D DenseNet (not worth a different classifier)
CHANNELS_LAST = {"mobilenet_v2", "convnext"}
TRAIN_SEED, TEST_SEED, EXPLAINED_SEED = 100, 200, 300  # the datasets (dataset_keys lists them)
TUNE_SEED = 400  # the tuning images: Med-CAM's settings (sweep.py) and Grad-CAM's layer are chosen on these, not on the reported ones
MEAN, STD = 0.45, 0.25  # every classifier standardises its input (a forward pre-hook), as torchvision's transforms would
COMBOS = [(b, lesion) for b in ("retina", "ihc", "radiology") for lesion in ("disc", "spots")]
TUNE_IMAGES = 2 * len(COMBOS)  # tuning images per architecture, 2 per (background, lesion) kind (a preset may set tune_images)
BEST_LAYER_METHOD = "Grad-CAM, best layer"  # the method name of Grad-CAM at best_grad_cam_layer's choice
NAMES = {"resnet18": "torchvision ResNet-18", "mobilenet_v2": "torchvision MobileNet-V2", "convnext": "torchvision ConvNeXt",
         "vit": "torchvision ViT", "densenet121_3d": "MONAI DenseNet121 (3D)"}


def build(arch: str, size: int, small: bool) -> tuple[torch.nn.Module, str, str]:
    """The untrained classifier, the layer Grad-CAM looks at, and a description."""
    net, layer, about = _build(arch, size, small)
    net.register_forward_pre_hook(lambda _module, args: ((args[0] - MEAN) / STD, *args[1:]))
    for module in net.modules():  # MONAI's Grad-CAM hooks cannot follow an in-place ReLU (DenseNet's class layers)
        if hasattr(module, "inplace"):
            module.inplace = False
    return net, layer, about


def _build(arch: str, size: int, small: bool) -> tuple[torch.nn.Module, str, str]:
    import torchvision.models as tv
    from monai.networks.nets import DenseNet121
    from torchvision.models.convnext import CNBlockConfig

    if arch == "resnet18":
        return tv.resnet18(num_classes=2), "layer4", "resnet18"
    if arch == "mobilenet_v2":
        return tv.mobilenet_v2(num_classes=2), "features.18", "mobilenet_v2"
    if arch == "convnext":
        if not small:  # layer scale 1 as below
            return tv.convnext_tiny(num_classes=2, layer_scale=1.0), "features.7", "convnext_tiny, layer scale 1"
        dims = [(32, 64, 2), (64, 128, 2), (128, 256, 4), (256, None, 2)]
        # layer scale 1 instead of 1e-6: with 1e-6 the blocks start as identities and 64 px training stays at chance
        net = tv.ConvNeXt([CNBlockConfig(*d) for d in dims], layer_scale=1.0, num_classes=2)
        return net, "features.7", "ConvNeXt, depths 2-2-4-2, widths 32-256, layer scale 1 (a reduced ConvNeXt-T)"
    if arch == "vit":
        # patch 4 at 64 px: 16x16 tokens, as ViT-B/16 has 14x14 at 224 px. With patch 8 (8x8 tokens, until
        # session 20) it reached test accuracy 0.920 and the lesion alone kept its label on 79% of lesion images
        layers, heads, dim, patch = (4, 4, 128, 4) if small else (6, 6, 384, 16)
        net = tv.VisionTransformer(image_size=size, patch_size=patch, num_layers=layers, num_heads=heads,
                                   hidden_dim=dim, mlp_dim=2 * dim if small else 4 * dim, num_classes=2)
        return net, f"encoder.layers.encoder_layer_{layers - 2}", f"ViT, {layers} layers, width {dim}, patch {patch}"
    if arch == "densenet121_3d":
        features, growth = (16, 8) if small else (64, 32)
        net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=features, growth_rate=growth)
        return net, "features.norm5", f"DenseNet121, init features {features}, growth rate {growth}"
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}.")


def _side(arch: str, p: dict) -> int:
    """The side of an architecture's inputs: the volume's for 3D, the image's for 2D."""
    return p["volume"] if arch.endswith("_3d") else p["size"]


def dataset(arch: str, count: int, p: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Images, labels, lesion masks and the background of each image (the same for every 2D architecture)."""
    return _dataset(arch.endswith("_3d"), count, _side(arch, p), seed)


def _part_count(volumes: bool) -> int:
    """A volume dataset is one part; a 2D one has a part per (background, lesion) combination."""
    return 1 if volumes else len(COMBOS)


def _part(volumes: bool, count: int, side: int, seed: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Part ``k`` of a dataset: the volumes, or the 2D images of the k-th (background, lesion) combination."""
    if volumes:
        d = make_known_evidence_3d(count, side, seed=seed)
    else:
        background, lesion = COMBOS[k]
        d = make_known_evidence(max(2, count // len(COMBOS)), side, background, lesion, seed=seed + k)
    return d.images, d.labels, d.lesion_masks.astype(bool)  # bool: the same values, fewer bytes from a worker process


_PENDING: dict[tuple, list[Future]] = {}


def prefetch(keys: list[tuple[bool, int, int, int]], workers: int) -> None:
    """Start making the datasets ``(volumes, count, side, seed)`` in worker processes; :func:`_dataset`
    collects them. On a GPU the CPU would otherwise make them one after the other while the GPU waits."""
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))  # workers use numpy only
    for key in sorted(set(keys), key=lambda key: (not key[0], -key[1])):  # the slowest (volumes, large sets) first
        _PENDING[key] = [executor.submit(_part, *key, k) for k in range(_part_count(key[0]))]
    executor.shutdown(wait=False)


@functools.lru_cache(maxsize=12)  # made once per run, not once per architecture (half a minute each at cpu-small)
def _dataset(volumes: bool, count: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    pending = _PENDING.pop((volumes, count, side, seed), None)
    parts = [f.result() for f in pending] if pending else [_part(volumes, count, side, seed, k) for k in range(_part_count(volumes))]
    names = ["MRI"] * count if volumes else [f"{b}/{lesion}" for (b, lesion), part in zip(COMBOS, parts) for _ in part[1]]
    cat = lambda i: torch.from_numpy(np.concatenate([part[i] for part in parts]))  # noqa: E731
    return cat(0), cat(1), cat(2).float(), names


def dataset_keys(arch: str, p: dict) -> list[tuple[bool, int, int, int]]:
    """The :func:`_dataset` keys an architecture's run uses: training, test, explained and tuning sets."""
    volumes = arch.endswith("_3d")
    sets = ((p["train_3d" if volumes else "train"], TRAIN_SEED), (p["test"], TEST_SEED), (8 * p["images"], EXPLAINED_SEED),
            (8 * _tune_count(p), TUNE_SEED))
    return [(volumes, count, _side(arch, p), seed) for count, seed in sets]


def _tune_count(p: dict) -> int:
    """How many tuning images Grad-CAM's layer is chosen on: the preset's (smoke, dry run), else ``TUNE_IMAGES``."""
    return p.get("tune_images", TUNE_IMAGES)


def tuning_images(
    arch: str, p: dict, net: torch.nn.Module, count: int, device: torch.device, seed: int = TUNE_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` lesion images of the dataset ``seed``, round-robin over the (background, lesion) kinds,
    and their lesion masks: those the classifier gets right first (for a weak classifier, then the others)."""
    pool, labels, truth, names = dataset(arch, 8 * count, p, seed=seed)
    chosen = lesion_images(labels, predict(net, pool, device), names, count)  # as the reported images are chosen
    return pool[chosen].to(device), truth[chosen].to(device)


def best_grad_cam_layer(arch: str, net: torch.nn.Module, p: dict, device: torch.device) -> tuple[str, dict[str, float]]:
    """The layer where Grad-CAM localises the lesion best on the tuning images, and each candidate's
    mean lesion IoU there (the map binarised at the lesion's area; :func:`grad_cam_layers`). Grad-CAM
    at its usual layer is a weak baseline at 64 px (2 x 2 maps); this is Grad-CAM at the best of its
    candidate layers, chosen away from the reported images as Med-CAM's settings are."""
    x, truth = tuning_images(arch, p, net, _tune_count(p), device)
    label = predict(net, x, device).to(device)
    scores = {}
    for layer in grad_cam_layers(net, x):
        cam = grad_cam(net, x, layer, label)
        scores[layer] = float(metrics.iou(metrics.binarize_top(cam, metrics.area_fraction(truth)), truth).mean())
    return max(scores, key=scores.get), scores


@torch.no_grad()
def predict(net: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x[i : i + 64].to(device)).argmax(1).cpu() for i in range(0, len(x), 64)])


def trained(
    arch: str, p: dict, preset: str, device: torch.device, cache_dir: Path, retrain: bool
) -> tuple[torch.nn.Module, str, str, float, float]:
    """The classifier trained here (or loaded from the cache), its Grad-CAM layer, description, test accuracy, training seconds."""
    torch.manual_seed(0)  # the same initial weights whichever architectures ran before
    net, layer, about = build(arch, p["size"], p["small"])
    cache = cache_dir / f"{preset}-{arch}.pt"
    info = cache.with_suffix(".json")
    count = p["train_3d" if arch.endswith("_3d") else "train"]
    lr, epochs = RECIPES[arch]
    epochs = max(1, epochs * p["epoch_scale"])
    removals = REMOVALS.get(arch, 0.0)
    channels_last = device.type == "cpu" and arch in CHANNELS_LAST
    config = {"about": about, "size": p["size"], "volume": p["volume"], "train": count, "epochs": epochs, "lr": lr, "small": p["small"],
              "input": [MEAN, STD]}  # "about": a changed network is trained again, not loaded
    if removals:
        config["removals"] = removals
    if channels_last:
        config["channels_last"] = True
    batch = p.get("batch", 32)
    if batch != 32:
        config["batch"] = batch
    meta = json.loads(info.read_text()) if info.is_file() else {}
    if not retrain and cache.is_file() and meta.get("config") == config:
        net.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        return net.to(device).eval(), layer, about, meta["accuracy"], meta["seconds"]
    x, y, lesions, _ = dataset(arch, count, p, seed=TRAIN_SEED)
    if removals:
        x, y = with_removals(x, y, lesions, removals, seed=101)
    t0 = time.perf_counter()
    net = fit(net, x, y, epochs, max_lr=lr, weight_decay=0.05, device=device, channels_last=channels_last, batch_size=batch)
    seconds = time.perf_counter() - t0
    xt, yt, _, _ = dataset(arch, p["test"], p, seed=TEST_SEED)
    accuracy = float((predict(net, xt, device) == yt).float().mean())
    with atomic_path(cache) as tmp:
        torch.save(net.state_dict(), tmp)
    with atomic_path(info) as tmp:
        Path(tmp).write_text(json.dumps({"config": config, "accuracy": accuracy, "seconds": seconds, "environment": environment()}))
    return net.eval(), layer, about, accuracy, seconds


def environment() -> dict[str, str]:
    """The CPU and the package versions a run's numbers depend on: classifiers trained from the same
    seeds and code came out different in another environment (docs/benchmark.md, session 35), so each
    report and cached classifier records them (``constraints.txt`` pins them for ``make venv``)."""
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), cpu)
    packages = ("torch", "torchvision", "monai", "numpy", "scipy", "scikit-image", "pillow")
    return {"cpu": cpu, **{name: version(name) for name in packages}}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def evidence_checks(net: torch.nn.Module, x: torch.Tensor, truth: torch.Tensor) -> dict:
    """Is the lesion the classifier's evidence? On lesion images ``x`` it classifies as lesions, with
    lesion masks ``truth``: the share where the lesion alone (zeros elsewhere) keeps the label, the
    mean share of the 8 random backgrounds under which it keeps it, and the share where zeroing the
    lesion removes the label. Where these are low, no explanation by removal can be the lesion."""
    if not len(x):
        return dict(validity_images=0, lesion_alone_keeps=None, lesion_alone_backgrounds=None, lesion_removed_flips=None)
    ones = torch.ones(len(x), dtype=torch.long, device=x.device)
    return dict(
        validity_images=len(x),
        lesion_alone_keeps=float(metrics.decision_kept(net, x, truth, ones).float().mean()),
        lesion_alone_backgrounds=float(metrics.decision_kept_under_backgrounds(net, x, truth, ones).mean()),
        lesion_removed_flips=float((~metrics.decision_kept(net, x, 1 - truth, ones)).float().mean()),
    )


def lesion_images(labels: torch.Tensor, predicted: torch.Tensor, names: list[str], count: int) -> list[int]:
    """Indices of ``count`` lesion images: those the classifier gets right first (then, for a weak
    classifier, the others), spread round-robin over the backgrounds and lesion kinds."""
    lesion = np.flatnonzero(labels.numpy() == 1)
    order = sorted(lesion, key=lambda i: (int(predicted[i] != 1), sum(names[j] == names[i] for j in lesion if j < i), i))
    return order[:count]


def interval(values: list[float], seed: int = 0, draws: int = 2000) -> tuple[float, float]:
    """The 95% bootstrap interval of the mean of per-image ``values`` (resampled with replacement):
    how far the reported mean could move with another sample of the same number of images."""
    v = np.asarray(values, dtype=float)
    means = v[np.random.default_rng(seed).integers(0, len(v), (draws, len(v)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def per_image_metrics(net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, raw: torch.Tensor, truth: torch.Tensor,
                      label: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image, each ``(B,)``: a binary ``mask``'s lesion IoU, share on the lesion (precision),
    decision kept (alone, under 8 random backgrounds) and area; the continuous map ``raw``'s energy
    in the lesion and pointing game."""
    return dict(
        iou=metrics.iou(mask, truth),
        precision=metrics.energy_in_truth(mask, truth),  # energy of the binary mask: like with like across methods
        kept=metrics.decision_kept(net, x, mask, label).float(),
        kept_backgrounds=metrics.decision_kept_under_backgrounds(net, x, mask, label),
        area=metrics.area_fraction(mask),
        energy=metrics.energy_in_truth(raw, truth),
        pointing=metrics.pointing_game(raw, truth).float(),
    )


def mask_metrics(net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, raw: torch.Tensor, truth: torch.Tensor,
                 label: torch.Tensor) -> dict:
    """The means over the images of :func:`per_image_metrics`."""
    return {k: float(v.mean()) for k, v in per_image_metrics(net, x, mask, raw, truth, label).items()}


def evaluate(arch: str, net: torch.nn.Module, layer: str, p: dict, device: torch.device) -> dict:
    """Every method on lesion images the classifier gets right; returns the rows and the figure's maps.
    ``layer``: Grad-CAM's usual layer (a CNN's last stage, the ViT's second-to-last block); Grad-CAM
    runs at its best layer too."""
    best_layer, layer_scores = best_grad_cam_layer(arch, net, p, device)
    pool, labels, truth, names = dataset(arch, 8 * p["images"], p, seed=EXPLAINED_SEED)
    predicted = predict(net, pool, device)
    lesion = np.flatnonzero(labels.numpy() == 1)
    chosen = lesion_images(labels, predicted, names, p["images"])
    correct = int((predicted[chosen] == 1).sum())
    right = [i for i in lesion if predicted[i] == 1]
    checks = evidence_checks(net, pool[right].to(device), truth[right].to(device))
    x, truth = pool[chosen].to(device), truth[chosen].to(device)
    names = [names[i] for i in chosen]
    n = len(x)

    explainer = MedCAM(net, steps=p["steps"])
    result, t_medcam = timed(lambda: explainer.explain(x))
    label, evidence = result.label, result.mask.as_tensor()
    maps: dict[str, torch.Tensor] = {}
    seconds = {"Med-CAM": t_medcam / n}
    cams, t = timed(lambda: grad_cams(net, x, layer, label))
    for k, v in cams.items():
        maps[k], seconds[k] = v, t / n / len(cams)
    maps[BEST_LAYER_METHOD], t = timed(lambda: grad_cam(net, x, best_layer, label))
    seconds[BEST_LAYER_METHOD] = t / n
    # 2D: patches of 1/8 of the side, overlapping by a quarter; 3D: 1/4 of the side, side by side (64 per volume)
    patch, overlap = (max(4, x.shape[-1] // 8), 0.25) if x.ndim == 4 else (max(4, x.shape[-1] // 4), 0.0)
    maps["Occlusion"], t = timed(lambda: occlusion(net, x, label, mask_size=patch, overlap=overlap))
    seconds["Occlusion"] = t / n
    maps["Extremal"], t = timed(lambda: extremal_perturbation(net, x, label, metrics.area_fraction(evidence), steps=p["extremal_steps"]))
    seconds["Extremal"] = t / n
    # extremal perturbation optimises a mask for one area: run again at the lesion's, for its row there
    at_lesion_area = {}
    at_lesion_area["Extremal"], t = timed(lambda: extremal_perturbation(net, x, label, metrics.area_fraction(truth), steps=p["extremal_steps"]))
    seconds["Extremal @ lesion area"] = t / n

    def row(method: str, mask: torch.Tensor, raw: torch.Tensor, values: dict[str, torch.Tensor] | None = None) -> dict:
        """A table row; ``values``: the maps' :func:`per_image_metrics`, where already computed."""
        if values is None:
            values = per_image_metrics(net, x, mask, raw, truth, label)
        ins, dele = metrics.insertion_deletion_auc(net, x, raw, label, steps=p["auc_steps"])
        return dict(
            method=method,
            **{k: float(v.mean()) for k, v in values.items()},
            insertion=float(ins.mean()),
            deletion=float(dele.mean()),
            s_per_image=seconds.get(method, seconds[method.split(" @")[0]]),
        )

    medcam = per_image_metrics(net, x, evidence, result.soft_mask, truth, label)
    rows = [row("Med-CAM", evidence, result.soft_mask, medcam)]
    for name, sal in maps.items():
        rows.append(row(f"{name} @ Med-CAM area", metrics.binarize_top(sal, metrics.area_fraction(evidence)), sal))
        sal = at_lesion_area.get(name, sal)
        rows.append(row(f"{name} @ lesion area", metrics.binarize_top(sal, metrics.area_fraction(truth)), sal))
    lesion_iou = medcam["iou"]
    non_binary = metrics.non_binary_fraction(result.soft_mask)
    per_image = {  # Med-CAM's per-image values of the targets' metrics, for their spread over the images
        "iou": lesion_iou,
        "energy": medcam["energy"],
        "non_binary": non_binary,
        "kept_backgrounds": medcam["kept_backgrounds"],
        # the lesion itself passes Med-CAM's verification: where it does not, no verified mask can be the lesion
        "lesion_verified": explainer.verify(x, truth, label).float(),
    }
    per_background = {b: float(lesion_iou[[i for i, nm in enumerate(names) if nm == b]].mean()) for b in dict.fromkeys(names)}
    return dict(
        rows=rows,
        images=n,
        correct=correct,
        verified=float(result.verified.float().mean()),
        settled=float(result.settled.float().mean()),
        # a mean alone hides one far-from-binary mask (one that ran out of steps, docs/settings.md): median and largest too
        non_binary=float(non_binary.mean()),
        non_binary_median=float(non_binary.median()),
        non_binary_max=float(non_binary.max()),
        median_steps=float(result.steps.float().median()),
        p_input=float(result.prob_input.mean()),
        p_evidence=float(result.prob_evidence.mean()),
        lesion_area=float(metrics.area_fraction(truth).mean()),
        grad_cam_layer=layer,
        grad_cam_best_layer=best_layer,
        grad_cam_layer_iou=layer_scores,  # on the tuning images, at the lesion's area
        **checks,
        medcam_iou_by_background=per_background,
        medcam_per_image={k: [round(float(v), 6) for v in values.cpu()] for k, values in per_image.items()},
        figure=(x, truth, evidence, maps, names),
    )


def _slices(t: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """For 3D ``(B, C, H, W, D)``: each volume's slice (last axis) with the most lesion voxels."""
    if t.ndim == 4:
        return t
    z = truth[:, 0].sum((1, 2)).argmax(-1)
    return torch.stack([t[i, ..., int(z[i])] for i in range(len(t))])


def figure(path: Path, fig: tuple) -> None:
    x, truth, evidence, maps, names = fig
    show = list(range(min(4, len(x))))
    cpu = lambda t: _slices(t[show].detach().cpu().float(), truth[show].cpu())  # noqa: E731
    save_panels(path, cpu(x), {"lesion": cpu(truth), "Med-CAM": cpu(evidence), **{k: cpu(v) for k, v in maps.items()}},
                row_titles=[names[i] for i in show], heatmaps=tuple(maps))


def _checks_sentence(a: dict) -> str:
    if not a.get("validity_images"):
        return "No lesion image classified correctly to check the lesion as evidence on."
    return (f"Is the lesion the evidence? On {a['validity_images']} lesion images it gets right, the lesion alone keeps the label "
            f"on {a['lesion_alone_keeps']:.0%} (under the 8 random backgrounds: {a['lesion_alone_backgrounds']:.0%}) and zeroing "
            f"it removes the label on {a['lesion_removed_flips']:.0%}.")


def _layer_sentence(a: dict) -> str:
    """Grad-CAM's two layers (reports from before the best layer was kept: nothing)."""
    scores = a.get("grad_cam_layer_iou")
    if not scores:
        return ""
    listed = ", ".join(f"`{layer}` {iou:.2f}" for layer, iou in scores.items())
    return (f" Grad-CAM runs at `{a['grad_cam_layer']}` (its usual layer) and, as \"{BEST_LAYER_METHOD}\", at "
            f"`{a['grad_cam_best_layer']}`: the best of {len(scores)} layers on the tuning images (its mean lesion IoU "
            f"at the lesion's area there: {listed}).")


def _spread_sentence(a: dict) -> str:
    """Med-CAM's means over the images with their 95% bootstrap intervals (reports from before they were kept: nothing)."""
    per = a.get("medcam_per_image")
    if not per or len(per["iou"]) < 2:
        return ""

    def cell(key: str, fmt: str) -> str:
        low, high = interval(per[key])
        return f"{fmt.format(np.mean(per[key]))} ({fmt.format(low)}-{fmt.format(high)})"

    text = (f" Med-CAM over the {len(per['iou'])} images, mean (95% bootstrap interval of the mean): lesion IoU {cell('iou', '{:.2f}')}, "
            f"energy {cell('energy', '{:.2f}')}, non-binary share {cell('non_binary', '{:.2%}')}, kept under backgrounds "
            f"{cell('kept_backgrounds', '{:.3f}')}.")
    ok = [i for i, v in enumerate(per["lesion_verified"]) if v]
    text += f" The lesion itself passes Med-CAM's verification on {len(ok)} of {len(per['iou'])} images"
    return text + (f" (Med-CAM's IoU on those: {np.mean([per['iou'][i] for i in ok]):.2f})." if ok else ".")


def markdown(report: dict) -> str:
    lines = [
        f"Preset `{report['preset']}`, {report['device']}, {report['date']}, torch {report['torch']}"
        + (f" ({', '.join(f'{k} {v}' for k, v in report['environment'].items())})" if "environment" in report else "")
        + ". Saliency maps binarised at Med-CAM's area and at the lesion's (extremal perturbation optimised for each); "
        "precision is the share of each binary mask on the lesion; energy, pointing game and insertion/deletion AUC "
        "(blur baseline; insertion higher is better, deletion lower) are computed on each method's "
        "continuous map (Med-CAM: its soft mask, which is near-binary, so its energy is close to its precision).",
    ]
    for arch, a in report["architectures"].items():
        lines += [
            "",
            f"### {NAMES[arch]}: {a['about']}",
            "",
            f"Input {a['input']}; trained here in {a['train_seconds']:.0f} s; test accuracy {a['accuracy']:.3f}. "
            f"{a['images']} lesion images ({a['correct']} classified correctly). Med-CAM: verified {a['verified']:.2f}, "
            f"settled {a.get('settled', float('nan')):.2f}, "
            f"non-binary share of the soft mask {a['non_binary']:.4f} (median {a.get('non_binary_median', float('nan')):.4f}, "
            f"largest {a.get('non_binary_max', float('nan')):.4f}), median steps {a['median_steps']:.0f}, "
            f"label probability {a['p_input']:.3f} on the input and {a['p_evidence']:.3f} on the evidence; "
            f"lesion area {a['lesion_area']:.2%}. {_checks_sentence(a)} Med-CAM IoU by background: "
            + ", ".join(f"{b} {v:.2f}" for b, v in a["medcam_iou_by_background"].items()) + "." + _layer_sentence(a) + _spread_sentence(a),
            "",
            f"![{arch}](images/quality_{report['preset']}_{arch}.png)",
            "",
            "| method | lesion IoU | precision | decision kept | kept under 8 backgrounds | area | energy in lesion | pointing game | insertion AUC | deletion AUC | s/image |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['iou']:.2f} | {r.get('precision', float('nan')):.2f} | {r['kept']:.2f} | {r['kept_backgrounds']:.2f} | "
            f"{r['area']:.2%} | {r['energy']:.2f} | {r['pointing']:.2f} | {r['insertion']:.2f} | {r['deletion']:.2f} | {r['s_per_image']:.3f} |"
            for r in a["rows"]
        ]
    return "\n".join(lines) + "\n"


def run_architecture(arch: str, p: dict, args: argparse.Namespace, device: torch.device, name: str, cache_name: str) -> dict:
    """Train (or load) one architecture's classifier, explain with every method, save its figure; its report section.
    ``name`` names the figure, ``cache_name`` the cached classifier."""
    started = time.perf_counter()
    net, layer, about, accuracy, train_seconds = trained(arch, p, cache_name, device, args.results / "models", args.retrain)
    print(f"{arch}: {about}, test accuracy {accuracy:.3f} (trained in {train_seconds:.0f} s)", flush=True)
    a = evaluate(arch, net, layer, p, device)
    print(f"  {_checks_sentence(a)} Med-CAM: median steps {a['median_steps']:.0f}, settled {a['settled']:.2f}, non-binary {a['non_binary']:.2%} "
          f"(median {a['non_binary_median']:.2%}, largest {a['non_binary_max']:.2%}); "
          f"{time.perf_counter() - started:.0f} s for this architecture", flush=True)
    figure(args.output / "images" / f"quality_{name}_{arch}.png", a.pop("figure"))
    for r in a["rows"]:
        print(f"  {r['method']:<28} IoU {r['iou']:.2f} prec {r['precision']:.2f} kept {r['kept']:.2f} bg {r['kept_backgrounds']:.2f} area {r['area']:.2%} "
              f"energy {r['energy']:.2f} ins {r['insertion']:.2f} del {r['deletion']:.2f} {r['s_per_image']:.3f} s", flush=True)
    side = _side(arch, p)
    shape = f"{side}^3 grayscale volumes" if arch.endswith("_3d") else f"{side} px RGB (grayscale radiology repeated)"
    return dict(about=about, input=shape, accuracy=accuracy, train_seconds=train_seconds, **a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--output", type=Path, help="report and figures (default: docs/; a dry run's: --results)")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, help="run only these; the report keeps the others' earlier results")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="JSON report and classifier cache")
    parser.add_argument("--retrain", action="store_true", help="train the classifiers again instead of using the cache")
    parser.add_argument("--dry-run", action="store_true",
                        help="the preset's sizes and models on the CPU, a few images and steps (quality_<preset>-dry): checks a GPU run's code paths")
    parser.add_argument("--images", type=int, default=None,
                        help="lesion images explained per architecture instead of the preset's (a larger sample for the verdict "
                             "against the targets), reported as quality_<preset>-<N>images; the preset's classifiers")
    args = parser.parse_args()
    args.output = args.output or (args.results if args.dry_run else ROOT / "docs")
    if args.images is not None and (args.images < 2 or args.dry_run):
        parser.error(f"--images must be 2 or more and cannot go with --dry-run (got {args.images}).")
    p = {**PRESETS[args.preset], **(DRY_RUN if args.dry_run else {})}
    cache_name = f"{args.preset}-dry" if args.dry_run else args.preset  # names the cached classifiers
    name = f"{args.preset}-{args.images}images" if args.images else cache_name  # names the report and figures
    if args.images:
        p["images"] = args.images
    device = torch.device(p["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset} needs a CUDA GPU; none is visible (use --preset cpu-small).")
    archs = args.archs or p["archs"]
    if device.type == "cuda":  # make every dataset ahead, in parallel, while the GPU trains and explains
        # half the cores: the explainers' steps are host-bound and need theirs
        prefetch([key for arch in archs for key in dataset_keys(arch, p)], workers=max(1, (os.cpu_count() or 2) // 2))
        torch.set_float32_matmul_precision("high")  # TF32 matrix products (the ConvNeXt and ViT MLPs)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    report = {"preset": name, "device": where, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "environment": environment(), "architectures": {}}
    json_path = args.results / f"quality_{name}.json"
    if args.archs and json_path.is_file():  # a subset run updates the earlier report's other architectures' sections
        report["architectures"] = json.loads(json_path.read_text())["architectures"]
    failed = []
    for arch in archs:
        try:
            report["architectures"][arch] = run_architecture(arch, p, args, device, name, cache_name)
        except Exception:  # one architecture's failure is reported; the others still run
            traceback.print_exc()
            failed.append(arch)
            continue
        # after each architecture, so a cut-off run keeps what it measured
        with atomic_path(json_path) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1))
        with atomic_path(args.output / f"quality_{name}.md") as tmp:
            Path(tmp).write_text(markdown(report))
    if failed:
        sys.exit(f"quality benchmark: {', '.join(failed)} failed (traceback above); the report holds the others.")
    print(f"wrote {args.output}/quality_{name}.md, {args.output}/images/quality_{name}_*.png and {json_path}")


if __name__ == "__main__":
    main()
