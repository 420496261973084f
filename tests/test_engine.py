"""Med-CAM on toy classifiers with known evidence: localisation, verification, independence, determinism."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from monai.data import MetaTensor

from monai_medcam import MedCAM, MedCAMSettings
from monai_medcam.backgrounds import baseline_image, blurred
from monai_medcam.engine import RESTART_SEED_STEP, _Attempt
from tests.toys import RegionClassifier, region_images, small_gpu_optimise

REGION = (slice(8, 16), slice(8, 16))
FAST = dict(max_retries=0)


def _region_mask(size: int = 32) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[REGION] = 1
    return mask


@pytest.fixture(scope="module")
def toy_result():
    return MedCAM(RegionClassifier(), **FAST).explain(region_images(3))


def test_mask_finds_the_known_region(toy_result):
    region = _region_mask()
    chance = region.mean().item()  # 1/16 of the image
    assert toy_result.verified.all()
    for i in range(3):
        mask = toy_result.mask[i, 0]
        inside = (mask * region).sum() / mask.sum().clamp_min(1)
        iou = (mask * region).sum() / ((mask + region) > 0).sum()
        assert inside > 10 * chance, f"image {i}: {inside:.2f} of the mask inside the region"
        assert iou > 0.5, f"image {i}: IoU {iou:.2f}"
    assert (toy_result.label == 1).all()
    assert (toy_result.prob_evidence > 0.5).all() and (toy_result.prob_background > 0.5).all()


def test_soft_mask_ends_near_binary(toy_result):
    # the sharpened sigmoid and the near-binary stop rule (binary_tol 5%) leave few soft values
    # between 0.01 and 0.99; the paper's plain sigmoid (sharpen_rate=0) leaves its background at a few percent
    soft = toy_result.soft_mask
    share = ((soft > 0.01) & (soft < 0.99)).flatten(1).float().mean(1)
    assert (share <= 0.05).all(), share
    plain = MedCAM(RegionClassifier(), sharpen_rate=0.0, **FAST).explain(region_images(1)).soft_mask
    assert ((plain > 0.01) & (plain < 0.99)).float().mean() > 2 * share[0]


def test_result_fields_are_consistent(toy_result):
    r = toy_result
    assert r.mask.shape == r.soft_mask.shape == (3, 1, 32, 32)
    assert set(r.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(r.mask.as_tensor(), (r.soft_mask > 0.5).float())
    assert torch.allclose(r.area, r.mask.flatten(1).mean(1))
    assert 0 < r.area.max() < 0.3
    # the toy's evidence (6% of the image) is over restart_above (3%): two restarts each, and the
    # steps of all three attempts counted
    assert r.retries.tolist() == [2, 2, 2]
    assert ((r.steps >= 3 * 40) & (r.steps <= 3 * 300)).all()
    assert not r.vacuous.any()
    assert (r.seconds > 0).all()
    assert len(r.summary()) == 3 and r.summary()[0]["verified"] is True


def test_late_binarisation_settles_hovering_pixels():
    # a run held to all 300 steps (min_steps) leaves, without the late term, background pixels whose
    # logits hover around the threshold: 6% of the toy's soft mask between 0.01 and 0.99; with it
    # (the default, from step 100) less than half of that, and the evidence still finds the region
    x = region_images(1)
    long_run = dict(min_steps=300, restarts=0, max_retries=0)
    without = MedCAM(RegionClassifier(), late_bin_weight=0.0, **long_run).explain(x)
    late = MedCAM(RegionClassifier(), **long_run).explain(x)
    share = [((r.soft_mask > 0.01) & (r.soft_mask < 0.99)).float().mean().item() for r in (without, late)]
    assert share[1] <= 0.03 and share[0] > 2 * share[1], share
    assert late.verified.all() and late.steps.tolist() == [300]
    region = _region_mask()
    iou = (late.mask[0, 0] * region).sum() / ((late.mask[0, 0] + region) > 0).sum()
    assert iou > 0.5, f"IoU {iou:.2f}"


def test_settled_says_whether_the_mask_stopped_before_its_step_budget(caplog):
    x = region_images(2)
    with caplog.at_level(logging.INFO, logger="monai_medcam.engine"):
        short = MedCAM(RegionClassifier(), steps=20, **FAST).explain(x)  # fewer steps than min_steps (40): nothing can settle
    assert "images [0, 1] ran out of steps before their masks settled" in caplog.text
    with caplog.at_level(logging.INFO, logger="monai_medcam.engine"):
        MedCAM(RegionClassifier(), steps=20, **FAST).explain(x, names=["mr slice 3", "ct.dcm"])
    assert "images [mr slice 3, ct.dcm] ran out of steps" in caplog.text  # the caller's names for them
    assert short.steps.tolist() == [20, 20] and short.settled.tolist() == [False, False]
    assert short.summary()[0]["settled"] is False
    full = MedCAM(RegionClassifier(), restarts=0, **FAST).explain(x)  # one attempt each
    assert full.settled.tolist() == [True, True]  # (one of them at the last check, step 300)
    soft = full.soft_mask
    assert (((soft > 0.01) & (soft < 0.99)).flatten(1).float().mean(1) <= 0.05).all()  # settled means near-binary (binary_tol)


def test_binary_evidence_really_keeps_the_decision(toy_result):
    model = RegionClassifier()
    x = region_images(3)
    with torch.no_grad():
        assert (model(toy_result.mask * x).argmax(1) == 1).all()
        assert (model(toy_result.mask * x + (1 - toy_result.mask) * torch.rand_like(x)).argmax(1) == 1).all()


def test_batch_independence_is_exact_with_deterministic_kernels():
    # oneDNN picks kernels by batch size; without it every image's arithmetic is the same alone or in a batch
    x = region_images(3, seed=5)
    explainer = MedCAM(RegionClassifier(), steps=150, max_retries=0)
    with torch.backends.mkldnn.flags(enabled=False):
        together = explainer.explain(x)
        alone = explainer.explain(x[1:2])
    assert torch.equal(together.soft_mask[1], alone.soft_mask[0])
    assert together.steps[1] == alone.steps[0] and together.verified[1] == alone.verified[0]


def test_batch_independence_with_default_kernels():
    # rounding differences only: tiny after two steps (the optimisation amplifies them later)
    x = region_images(3, seed=5)
    explainer = MedCAM(RegionClassifier(), steps=2, check_every=100, max_retries=0)
    together, alone = explainer.explain(x), explainer.explain(x[1:2])
    assert (together.soft_mask[1] - alone.soft_mask[0]).abs().max() < 1e-4


def test_an_autocast_around_the_call_does_not_reach_the_explainer():
    # MONAI's evaluators with amp=True call the inferer inside autocast: the reference pass and the checks
    # ran in half precision then, the masks in float32 (areas 0.27/0.34 against 0.28/0.26 on this toy)
    x = region_images(2, seed=3)
    explainer = MedCAM(RegionClassifier(), steps=20, max_retries=0, restarts=0)
    plain = explainer.explain(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = explainer.explain(x)
        checked = explainer.verify(x, plain.mask)
    assert torch.equal(plain.soft_mask, cast.soft_mask) and torch.equal(plain.prob_background, cast.prob_background)
    assert torch.equal(checked, plain.verified)


def test_batch_background_couples_images():
    # the one setting that makes images depend on each other does show up in the test above's measure
    x = region_images(3, seed=5)
    # (shrinking off: it would cut both large two-step masks down to the same ball around the region)
    explainer = MedCAM(RegionClassifier(), steps=2, check_every=100, max_retries=0, backgrounds=("batch",), init_keep=0.5,
                       shrink_rounds=0)
    together, alone = explainer.explain(x), explainer.explain(x[1:2])
    assert (together.soft_mask[1] - alone.soft_mask[0]).abs().max() > 1e-3


def test_same_seed_same_mask_different_seed_differs():
    x = region_images(1, seed=3)
    a = MedCAM(RegionClassifier(), steps=30, max_retries=0, seed=1).explain(x)
    b = MedCAM(RegionClassifier(), steps=30, max_retries=0, seed=1).explain(x)
    c = MedCAM(RegionClassifier(), steps=30, max_retries=0, seed=2).explain(x)
    assert torch.equal(a.soft_mask, b.soft_mask)
    assert not torch.equal(a.soft_mask, c.soft_mask)


def test_metatensor_metadata_carried_and_call_returns_mask():
    x = MetaTensor(region_images(1), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])), meta={"filename_or_obj": "toy.png"})
    mask = MedCAM(RegionClassifier(), steps=5, max_retries=0)(x)
    assert isinstance(mask, MetaTensor)
    assert mask.meta["filename_or_obj"] == "toy.png"
    assert torch.equal(mask.affine, x.affine)


def test_three_dimensional_volume():
    region = (slice(4, 12), slice(4, 12))
    model = RegionClassifier(size=16, region=region, spatial_dims=3)
    x = 0.3 * torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, :, 4:12, 4:12, 4:12] += 0.8
    result = MedCAM(model, max_retries=0, mask_features=(4, 4, 8, 8, 16, 4)).explain(x)
    assert result.mask.shape == (1, 1, 16, 16, 16)
    assert result.verified.all()
    inside = result.mask[0, 0, 4:12, 4:12, 4:12].sum() / result.mask.sum()
    assert inside > 0.8
    assert result.area.item() < 0.3


def test_single_logit_classifier_is_explained():
    class OneLogit(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = RegionClassifier()

        def forward(self, x):
            logits = self.inner(x)
            return logits[:, 1] - logits[:, 0]

    result = MedCAM(OneLogit(), max_retries=0).explain(region_images(1))
    assert result.label.tolist() == [1]
    assert result.verified.all()
    assert result.area.item() < 0.3


def test_a_float64_default_dtype_gives_the_same_float32_masks():
    """Under ``torch.set_default_dtype(torch.float64)`` the mask networks are still built in float32
    (the evidence is float32): the same masks as under the default, for a float64 classifier too."""
    x, classifier = region_images(1), RegionClassifier()
    before = MedCAM(classifier, steps=10, max_retries=0, restarts=0, prune_components=0, shrink_rounds=0).explain(x)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        after = MedCAM(classifier, steps=10, max_retries=0, restarts=0, prune_components=0, shrink_rounds=0).explain(x)
        wide = MedCAM(RegionClassifier(), steps=10, max_retries=0, restarts=0, prune_components=0, shrink_rounds=0).explain(x)  # built in float64
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(after.soft_mask, before.soft_mask) and after.soft_mask.dtype == torch.float32
    assert wide.mask.shape == x[:, :1].shape and after.seconds.dtype == torch.float32


def test_class_idx_explains_the_requested_class():
    result = MedCAM(RegionClassifier(), steps=10, max_retries=0).explain(region_images(2), class_idx=[0, 1])
    assert result.label.tolist() == [0, 1]


def test_vacuous_case_is_flagged(caplog):
    # class 0 ("no bright region") is what the classifier says for an empty image
    result = MedCAM(RegionClassifier(), steps=20, max_retries=0).explain(region_images(1), class_idx=0)
    assert result.vacuous.tolist() == [True]
    assert "vacuous" in caplog.text


def test_skip_vacuous_gives_empty_verified_masks_without_steps():
    images = region_images(3)
    images[1] = 0.3 * torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(1))  # no region: class 0, vacuous
    full = MedCAM(RegionClassifier(), steps=40, max_retries=0).explain(images)
    skipped = MedCAM(RegionClassifier(), steps=40, max_retries=0, skip_vacuous=True).explain(images)
    assert skipped.vacuous.tolist() == full.vacuous.tolist() == [False, True, False]
    assert skipped.steps.tolist()[1] == 0 and full.steps.tolist()[1] > 0
    assert skipped.mask[1].sum() == 0 and skipped.area[1] == 0
    assert skipped.verified[1]  # "no region" holds with nothing shown, over every random background
    assert skipped.settled[1]  # nothing was optimised, so nothing is left unfinished
    for i in (0, 2):  # the others are optimised as before
        assert skipped.verified[i] and skipped.steps[i] > 0 and 0 < skipped.area[i] < 0.3


def test_unverified_mask_is_never_reported_verified():
    # a mask network that starts empty and can hardly move cannot keep the decision
    result = MedCAM(RegionClassifier(), steps=4, check_every=1, lr=1e-9, init_keep=0.01, max_retries=1).explain(region_images(1))
    assert result.label.tolist() == [1]
    assert result.mask.sum().item() == 0
    assert result.verified.tolist() == [False]
    assert result.settled.tolist() == [False]
    assert result.retries.tolist() == [1]
    assert result.steps.tolist() == [4 + 8]
    assert result.prob_evidence.item() < 0.5


def test_unknown_setting_is_a_type_error_listing_valid_ones():
    with pytest.raises(TypeError, match="unknown MedCAM setting.*'stpes'.*valid settings.*'steps'"):
        MedCAM(RegionClassifier(), stpes=10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"area_weight": -1.0}, "area_weight must be a finite number >= 0"),
        ({"baseline": "black"}, "baseline must be one of"),
        ({"backgrounds": ("plaid",)}, "backgrounds must be a non-empty subset"),
        ({"init_keep": 1.5}, "init_keep must lie in"),
        ({"sharpen_max": 0.5}, "sharpen_max >= 1"),
        ({"sharpen_rate": -0.1}, "sharpen_rate must be >= 0"),
        ({"binary_tol": 2}, "binary_tol must lie in"),
        ({"late_bin_weight": -1.0}, "late_bin_weight must be a finite number >= 0"),
        ({"late_bin_start": -1}, "late_bin_start must be an integer >= 0"),
        ({"restarts": -1}, "restarts must be an integer >= 0"),
        ({"restart_above": 1.5}, "restart_above must be a number in"),
        ({"restart_above": True}, "restart_above must be a number in"),
        ({"prune_components": -1}, "prune_components must be an integer >= 0"),
        ({"shrink_rounds": -1}, "shrink_rounds must be an integer >= 0"),
        ({"shrink_rounds": 1.5}, "shrink_rounds must be an integer >= 0"),
        ({"verify_seed": 1.5}, "verify_seed must be an integer or None"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"seed": None}, "seed must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"skip_vacuous": "maybe"}, "skip_vacuous must be true or false, got 'maybe'"),
        ({"hard_mask": None}, "hard_mask must be true or false"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MedCAMSettings(**kwargs)


def test_settings_take_one_background_name_and_numpy_seeds():
    import numpy as np

    s = MedCAMSettings(backgrounds="gaussian", seed=np.int64(3), verify_seed=np.int32(4))
    assert s.backgrounds == ("gaussian",)  # not split into letters
    assert (s.seed, s.verify_seed) == (3, 4) and type(s.seed) is int


def test_batch_size_optimises_that_many_images_together(monkeypatch):
    optimise, sizes = MedCAM._explain, []

    def spy(self, data, *args):
        sizes.append(data.shape[0])
        return optimise(self, data, *args)

    monkeypatch.setattr(MedCAM, "_explain", spy)
    result = MedCAM(RegionClassifier(), steps=3, check_every=1, max_retries=0, restarts=0).explain(region_images(5), batch_size=2)
    assert sizes == [2, 2, 1] and result.mask.shape == (5, 1, 32, 32)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        MedCAM(RegionClassifier()).explain(region_images(1), batch_size=0)
    with pytest.raises(ValueError, match="names gives 1 names for a batch of 2"):
        MedCAM(RegionClassifier()).explain(region_images(2), names=["a"])


def test_switches_take_the_words_a_command_line_gives():
    """``python -m monai.bundle run ... --skip_vacuous false`` passes the string "false": it must mean False."""
    s = MedCAMSettings(skip_vacuous="false", amp="TRUE", progress="0", hard_mask=True)
    assert (s.skip_vacuous, s.amp, s.progress, s.hard_mask) == (False, True, False, True)


@pytest.mark.parametrize("baseline", ["mean", "blur"])
@pytest.mark.parametrize("hard_mask", [True, False])
def test_baselines_and_soft_mode_run(baseline, hard_mask):
    result = MedCAM(RegionClassifier(), steps=10, baseline=baseline, hard_mask=hard_mask,
                    backgrounds=("batch", "gaussian"), max_retries=0).explain(region_images(2))
    assert result.mask.shape == (2, 1, 32, 32)
    assert torch.isfinite(result.soft_mask).all()


def test_batch_too_large_for_gpu_memory_is_explained_in_parts(monkeypatch, caplog):
    # stand-in for a GPU that holds at most two images' optimisation: the batch of five is split
    # into halves until each part fits, later calls start from the size that fitted, and every
    # image's result is the one it gets in a batch that fits (exact with deterministic kernels)
    x = region_images(5, seed=5)
    explainer = MedCAM(RegionClassifier(), steps=60, max_retries=0, restarts=0)  # one _optimise call per part
    sizes = []
    with torch.backends.mkldnn.flags(enabled=False):
        reference = explainer.explain(x)
        monkeypatch.setattr(MedCAM, "_optimise", small_gpu_optimise(2, sizes))
        with caplog.at_level("WARNING", logger="monai_medcam.engine"):
            parts = explainer.explain(x, class_idx=[1, 1, 1, 1, 1])
        assert sizes == [5, 2, 2, 1]  # all five fail together, then 2 + 2 + 1 fit
        assert "out of GPU memory with 5 images at once; explaining them 2 at a time" in caplog.text
        assert torch.equal(parts.soft_mask, reference.soft_mask) and torch.equal(parts.steps, reference.steps)
        assert isinstance(parts.mask, MetaTensor) and parts.mask.shape == (5, 1, 32, 32)
        assert parts.seconds.shape == (5,) and (parts.seconds > 0).all()
        sizes.clear()
        again = explainer.explain(x)
    assert sizes == [2, 2, 1]  # no failed attempt the second time
    assert torch.equal(again.soft_mask, reference.soft_mask)


def test_a_part_that_ran_out_of_memory_is_freed_before_the_smaller_parts_start(monkeypatch):
    """The failed attempt's mask networks, optimiser state and activations (held by the exception's
    traceback) must be gone when the halved parts start, or they would run out of memory too."""
    import weakref

    optimise, held, alive_at_retry = MedCAM._optimise, [], []

    def small_gpu(self, x, *args):
        alive_at_retry.append(sum(ref() is not None for ref in held))
        if x.shape[0] > 1:
            state = torch.zeros(x.shape[0], 1000)  # stands for what the failed attempt had allocated
            held.append(weakref.ref(state))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return optimise(self, x, *args)

    monkeypatch.setattr(MedCAM, "_optimise", small_gpu)
    result = MedCAM(RegionClassifier(), steps=5, max_retries=0, restarts=0).explain(region_images(4, seed=5))
    assert result.mask.shape == (4, 1, 32, 32)
    assert len(held) == 2 and alive_at_retry == [0, 0, 0, 0, 0, 0]  # 4 and 2 failed; four parts of one, none held


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory (test)"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),  # cuBLAS's own
])
def test_out_of_memory_in_the_reference_pass_also_halves_the_batch(caplog, error):
    """The first pass of the classifier over the batch can run out of GPU memory too (cuBLAS says so
    with a RuntimeError): it must reach the halving, not become the "classifier refused the input" error."""

    class SmallGpu(RegionClassifier):
        def forward(self, x):
            if x.shape[0] == 3 and not torch.is_grad_enabled():  # the reference pass over the three images
                raise error
            return super().forward(x)

    with caplog.at_level("WARNING", logger="monai_medcam.engine"):
        result = MedCAM(SmallGpu(), steps=5, max_retries=0, restarts=0).explain(region_images(3, seed=5))
    assert "out of GPU memory with 3 images at once; explaining them 1 at a time" in caplog.text
    assert result.mask.shape == (3, 1, 32, 32)


def test_a_data_parallel_classifier_runs_the_network_inside(monkeypatch):
    """DataParallel's replicas share the capture hooks (on several GPUs the last replica's rows would
    be kept as the batch's activations): the network inside runs, with the wrapper's layer names."""
    net = RegionClassifier()
    x = region_images(2, seed=5)
    plain = MedCAM(net, steps=20, max_retries=0, restarts=0).explain(x)

    def replicas(self, *args, **kwargs):
        raise AssertionError("DataParallel.forward ran")

    monkeypatch.setattr(nn.DataParallel, "forward", replicas)
    wrapped = MedCAM(nn.DataParallel(net), steps=20, max_retries=0, restarts=0)
    assert all(layer.name.startswith("module.") for layer in wrapped.classifier.layers)
    result = wrapped.explain(x)
    assert torch.equal(result.soft_mask, plain.soft_mask) and torch.equal(result.label, plain.label)


def test_seeding_the_mask_networks_leaves_the_gpus_random_states_alone(monkeypatch):
    from monai_medcam.masknet import StackedMaskNet

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    before = torch.random.get_rng_state()
    a, b = StackedMaskNet(2, 2, 1, seed=3), StackedMaskNet(2, 2, 1, seed=3)
    assert seeded == [] and torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_cudnn_benchmark_mode_is_off_while_explaining_and_restored_after(monkeypatch):
    # benchmark mode would re-tune cuDNN's kernels each time the batch shrinks (finished images leave)
    optimise, seen = MedCAM._optimise, []

    def spy(self, *args):
        seen.append(torch.backends.cudnn.benchmark)
        return optimise(self, *args)

    monkeypatch.setattr(MedCAM, "_optimise", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    MedCAM(RegionClassifier(), steps=5, max_retries=0).explain(region_images(1))
    assert seen and not any(seen)  # every attempt (the first and any restarts)
    assert torch.backends.cudnn.benchmark is True


def test_defaults_by_spatial_dims_and_classifier(monkeypatch):
    # volumes need a stronger area term and a slower decay, vision transformers a stronger
    # activation term (part of a lesion can keep a ViT's token maps nearly where all of it does);
    # docs/settings.md. Explicit values win.
    from torchvision.models import VisionTransformer

    s = MedCAMSettings()
    d2, d3 = s.resolved(2, transformer=False), s.resolved(3, transformer=False)
    assert (d2.area_weight, d2.lr_decay, d3.area_weight, d3.lr_decay) == (20.0, 0.97, 120.0, 0.99)
    assert (d2.restart_above, d3.restart_above) == (0.03, 0.01)
    assert (d2.late_bin_weight, d3.late_bin_weight) == (100.0, 0.0)
    assert (d2.baseline, d3.baseline) == ("mean", "zeros")
    assert (d2.mine_backgrounds, d3.mine_backgrounds) == (True, False)
    assert MedCAMSettings(mine_backgrounds="yes").resolved(3, transformer=False).mine_backgrounds is True
    assert (d2.act_weight, d3.act_weight, s.resolved(2, transformer=True).act_weight) == (10.0, 10.0, 40.0)
    explicit = MedCAMSettings(restart_above=0.2, late_bin_weight=5.0, baseline="blur", area_weight=7.0, act_weight=3.0)
    for resolved in (explicit.resolved(2, transformer=True), explicit.resolved(3, transformer=False)):
        assert (resolved.restart_above, resolved.late_bin_weight, resolved.baseline, resolved.area_weight, resolved.act_weight) == (0.2, 5.0, "blur", 7.0, 3.0)
    optimise, seen = MedCAM._optimise, []

    def spy(self, x, *args):  # the settings the optimisation is given
        seen.append((x.ndim, args[-1].area_weight, args[-1].lr_decay, args[-1].act_weight))
        return optimise(self, x, *args)

    monkeypatch.setattr(MedCAM, "_optimise", spy)
    quick = dict(steps=2, max_retries=0, restarts=0, verify_backgrounds=1)
    MedCAM(RegionClassifier(), **quick).explain(region_images(1))
    volumes = RegionClassifier(size=16, region=(slice(4, 12), slice(4, 12)), spatial_dims=3)
    MedCAM(volumes, **quick).explain(torch.rand(1, 1, 16, 16, 16))
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=2)
    MedCAM(vit, **quick).explain(torch.rand(1, 3, 32, 32))
    MedCAM(vit, act_weight=5.0, **quick).explain(torch.rand(1, 3, 32, 32))
    assert seen == [(4, 20.0, 0.97, 10.0), (5, 120.0, 0.99, 10.0), (4, 20.0, 0.97, 40.0), (4, 20.0, 0.97, 5.0)]


def test_large_verified_masks_are_restarted_and_the_best_kept():
    # restart_above=0: every verified mask is optimised again from two other seeds; the result is,
    # per image, the verified mask of the three runs that scores lowest on the objective, with all
    # their steps counted
    x = region_images(2)
    seeds = [k * RESTART_SEED_STEP for k in range(3)]
    # restarts are verified on the first seed's backgrounds (verify_seed), as these runs are
    runs = [MedCAM(RegionClassifier(), steps=100, max_retries=0, restarts=0, seed=seed, verify_seed=0).explain(x) for seed in seeds]
    assert all(r.verified.all() for r in runs)
    best = MedCAM(RegionClassifier(), steps=100, max_retries=0, restarts=2, restart_above=0.0).explain(x)
    assert best.verified.all()
    assert best.retries.tolist() == [2, 2]
    assert best.steps.tolist() == sum(r.steps for r in runs).tolist()
    scorer = MedCAM(RegionClassifier())
    s = scorer.settings.resolved(2, transformer=False)
    with scorer.classifier.frozen():
        ref_logits, ref_acts = scorer._reference(x)
        args = (x, ref_logits.argmax(1), ref_logits, ref_acts, baseline_image(x, s.baseline), blurred(x), s)
        scores = torch.stack([scorer._hard_objective(r.mask.as_tensor(), *args)[0] for r in runs])  # (3 seeds, 2 images)
    assert len({tuple(r.area.tolist()) for r in runs}) > 1, "the seeds should give different masks"
    for i, seed in enumerate(scores.argmin(0).tolist()):  # ties go to the earlier seed, as in the engine
        assert torch.equal(best.mask[i].as_tensor(), runs[seed].mask[i].as_tensor()), f"image {i}"
    # the objective, not the area, decides: on this toy a smaller mask of another seed scores worse
    smallest = torch.stack([r.area for r in runs]).argmin(0)
    assert any(scores[k, i] > scores[:, i].min() for i, k in enumerate(smallest.tolist())), "no image where the two rules differ"
    # masks under the threshold (after pruning, before shrinking) are not restarted, and with fewer
    # steps than min_steps (no mask can settle) none is, whatever its size
    unshrunk = MedCAM(RegionClassifier(), steps=100, max_retries=0, restarts=0, shrink_rounds=0).explain(x)
    assert unshrunk.area.max() < 0.1
    assert MedCAM(RegionClassifier(), steps=100, max_retries=0, restart_above=0.1).explain(x).retries.tolist() == [0, 0]
    short = MedCAM(RegionClassifier(), steps=20, max_retries=0, restart_above=0.0).explain(x)
    assert short.retries.tolist() == [0, 0] and short.steps.tolist() == [20, 20]


def test_restarts_keep_the_lowest_objective_among_verified_masks(monkeypatch):
    # the rule alone, on scripted attempts: seeds 0, 1, 2 give masks of 40, 30, 20 pixels (image 0)
    # and 41, 31, 21 (image 1), the objective scripted per mask size. Image 0: both smaller
    # restarts score worse, the first mask stays. Image 1: the second wins. Every attempt is
    # verified on the first seed's backgrounds. Each attempt says it stalled (was large before
    # shrinking), so all are restarted although every mask is under restart_above now.
    scripted = {40: (2.0, True), 30: (3.0, True), 20: (2.5, True), 41: (2.0, True), 31: (1.5, True), 21: (1.8, True)}
    seen = []

    def optimise(self, x, label, ref_logits, ref_acts, base, x_blurred, s):
        seen.append((s.seed, s.verify_seed))
        k = s.seed // RESTART_SEED_STEP
        hard = torch.zeros(len(x), 1, *x.shape[2:])
        for i in range(len(x)):
            hard[i].view(-1)[: 40 - 10 * k + i] = 1
        ones = torch.ones(len(x), dtype=torch.bool)
        return _Attempt(soft=hard.clone(), hard=hard, verified=ones, settled=ones.clone(), steps=torch.full((len(x),), 50),
                        stalled=ones.clone())

    def objective(self, hard, *args):
        loss, ok = zip(*(scripted[int(n)] for n in hard.flatten(1).sum(1)))
        return torch.tensor(loss), torch.tensor(ok)

    monkeypatch.setattr(MedCAM, "_optimise", optimise)
    monkeypatch.setattr(MedCAM, "_hard_objective", objective)
    result = MedCAM(RegionClassifier(), max_retries=0, restart_above=0.5).explain(region_images(2))
    assert result.mask.flatten(1).sum(1).tolist() == [40, 31]
    assert result.retries.tolist() == [2, 2] and result.steps.tolist() == [150, 150]
    assert seen == [(0, 0), (RESTART_SEED_STEP, 0), (2 * RESTART_SEED_STEP, 0)]


class BrightnessClassifier(nn.Module):
    """Class 1 when the image's mean intensity exceeds 0.3: any evidence over the image's mean
    keeps it, while the paper's ``m x`` on zeros keeps it only when the mask covers most of it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)  # the identity: a layer for activation matching
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.conv(x).flatten(1).mean(1)
        return torch.stack([0.3 - score, score - 0.3], dim=1) * 20


def test_verification_checks_the_papers_evidence_on_zeros_too():
    x = torch.full((1, 1, 32, 32), 0.6)
    x[..., 8:16, 8:16] = 0.9
    small = torch.zeros(1, 1, 32, 32)
    small[..., 8:16, 8:16] = 1
    label = torch.ones(1, dtype=torch.long)
    for baseline, rows in (("mean", 1 + 8 + 1), ("zeros", 1 + 8)):
        explainer = MedCAM(BrightnessClassifier(), baseline=baseline)
        s = explainer.settings.resolved(2, transformer=False)
        base, x_blurred = baseline_image(x, s.baseline), blurred(x)
        with explainer.classifier.frozen(), torch.no_grad():
            checks = explainer._check_logits(x, small, base, x_blurred, s)
            _, ok = explainer._hard_objective(small, x, label, *explainer._reference(x), base, x_blurred, s)
            _, whole_ok = explainer._hard_objective(torch.ones_like(small), x, label, *explainer._reference(x), base, x_blurred, s)
        assert checks.shape == (rows, 1, 2)
        assert checks[0].argmax(1).item() == (1 if baseline == "mean" else 0)  # over the mean: kept
        if baseline == "mean":
            assert torch.allclose(checks[-1], explainer.classifier.logits(small * x))  # the last row: m x on zeros
        assert not ok.item()  # kept over the mean, lost on zeros: not verified
        assert whole_ok.item()  # the whole image keeps the label on every row: verified


def test_verification_backgrounds_follow_verify_seed_not_seed():
    x = region_images(1)
    explainer = MedCAM(RegionClassifier(), seed=3)
    s = explainer.settings.resolved(2, transformer=False)
    assert s.verify_seed == 3 and MedCAM(RegionClassifier(), seed=3, verify_seed=8).settings.resolved(2, transformer=False).verify_seed == 8
    hard = _region_mask()[None, None]
    with explainer.classifier.frozen(), torch.no_grad():
        checks = [explainer._check_logits(x, hard, baseline_image(x, s.baseline), blurred(x), c)
                  for c in (s, replace(s, seed=99), replace(s, verify_seed=99))]
    assert torch.equal(checks[0], checks[1])  # another seed (a restart): the same backgrounds
    assert torch.equal(checks[0][0], checks[2][0]) and not torch.equal(checks[0][1:], checks[2][1:])


def test_mining_keeps_the_first_outside_each_mask_lost_the_label_over():
    """Rows of the checks: baseline, two backgrounds, zeros; three active images of five."""
    label = torch.tensor([1, 1, 0])
    checks = torch.zeros(4, 3, 2)
    checks[..., 1] = 1.0  # every row predicts class 1
    checks[0, 1, 1] = -1.0  # image 1 loses the label over the baseline only: the fidelity terms' business, not mined
    # image 2 (label 0) loses it everywhere but over the first background
    checks[1, 2, 0] = 2.0
    checks[2, 0, 1] = -1.0  # image 0 loses it over the second background
    checks[3, 0, 1] = -1.0  # and over zeros: the first of the two is kept
    outsides = [torch.full((3, 1, 4, 4), float(row)) for row in range(4)]
    active = torch.tensor([0, 2, 4])
    mined, has_mined = torch.full((5, 1, 4, 4), -1.0), torch.tensor([False, False, True, True, True])
    MedCAM._mine(checks, label, outsides, active, mined, has_mined)
    assert has_mined.tolist() == [True, False, False, True, True]  # image 2 (active 1) forgot; 1 and 3 not active: untouched
    assert (mined[0] == 2.0).all() and (mined[2] == -1.0).all()
    assert (mined[4] == 2.0).all()  # active image 2: lost over rows 2 and 3 (label 0, they predict 1); row 1 kept it


def test_an_outside_the_mask_lost_the_label_over_is_drawn_every_second_step(monkeypatch):
    """The robustness term's outside is the mined one on even steps, a fresh random one on odd steps."""
    seen = []

    class Recording(RegionClassifier):
        def forward(self, x):
            if x.requires_grad:  # the optimisation's passes (the checks run without gradients)
                seen.append(x.detach().clone())
            return super().forward(x)

    def mine_a_sentinel(checks, label, outsides, active, mined, has_mined):
        mined[active], has_mined[active] = 7.0, True

    monkeypatch.setattr(MedCAM, "_mine", staticmethod(mine_a_sentinel))
    x = region_images(1)
    MedCAM(Recording(), steps=6, check_every=1, init_keep=0.2, max_retries=0, restarts=0, shrink_rounds=0, prune_components=0).explain(x)
    # each pass: the evidence, then the random outside; the mask starts empty, so the outside fills nearly all of it
    sentinel = [float((batch[1] == 7.0).float().mean()) for batch in seen[:6]]
    assert all(share > 0.5 for share in sentinel[1::2]), sentinel  # steps 2, 4, 6
    assert all(share == 0.0 for share in sentinel[0::2]), sentinel  # steps 1, 3, 5
    monkeypatch.undo()
    seen.clear()
    MedCAM(Recording(), steps=6, check_every=1, init_keep=0.2, max_retries=0, restarts=0, shrink_rounds=0, prune_components=0,
           mine_backgrounds=False).explain(x)
    assert len(seen) >= 6 and all(float((batch[1] == 7.0).float().mean()) == 0.0 for batch in seen)


def _attempt_with_a_stray_blob(explainer: MedCAM, x: torch.Tensor):
    """The region plus a blob far from it, as a stalled optimisation leaves it, and what _prune needs."""
    hard = _region_mask().expand(len(x), 1, 32, 32).clone()
    hard[:, :, 22:28, 22:28] = 1  # the blob: outside the region the logits depend on (the activations do see it)
    ones = torch.ones(len(x), dtype=torch.bool)
    attempt = _Attempt(soft=hard * 0.97, hard=hard, verified=ones, settled=ones.clone(), steps=torch.full((len(x),), 50),
                       stalled=ones.clone())
    s = explainer.settings.resolved(2, transformer=False)
    ref_logits, ref_acts = explainer._reference(x)
    label = ref_logits.argmax(1)
    return attempt, (x, label, ref_logits, ref_acts, baseline_image(x, s.baseline), blurred(x), s)


def test_pruning_drops_a_component_the_objective_does_not_need():
    explainer = MedCAM(RegionClassifier())
    x = region_images(2, seed=3)
    with explainer.classifier.frozen():  # the target layers' hooks are in place only while frozen
        attempt, args = _attempt_with_a_stray_blob(explainer, x)
        before = attempt.hard.clone()
        loss_before, verified_before = explainer._hard_objective(before, *args)
        attempt.verified[1] = False  # an unverified mask is left as it is
        explainer._prune(attempt, *args)
        loss_after, verified_after = explainer._hard_objective(attempt.hard, *args)
    region = _region_mask()
    assert verified_before.all() and verified_after[0]
    assert torch.equal(attempt.hard[0, 0], region)  # the blob is gone, the region whole
    assert loss_after[0] < loss_before[0]
    assert torch.equal(attempt.soft[0, 0], region * 0.97)  # the soft mask zeroed where the blob was
    assert torch.equal(attempt.hard[1], before[1])  # unverified: untouched
    with explainer.classifier.frozen():  # a candidate must also pass K fresh backgrounds, not only the verification's
        first, fresh = (explainer._check_logits(x, before, *args[4:], draw=d) for d in (0, 1))
    k = explainer.settings.verify_backgrounds
    assert torch.equal(first[0], fresh[0]) and not torch.equal(first[1 : 1 + k], fresh[1 : 1 + k])
    assert len(first) == k + 2 and len(fresh) == k + 1  # m x on zeros (the mean baseline) only in the verification
    # a mask of one component is never emptied, and prune_components=0 turns pruning off
    one = _Attempt(soft=region.expand(2, 1, 32, 32).clone(), hard=region.expand(2, 1, 32, 32).clone(),
                   verified=torch.ones(2, dtype=torch.bool), settled=torch.ones(2, dtype=torch.bool), steps=attempt.steps,
                   stalled=torch.ones(2, dtype=torch.bool))
    off = MedCAM(RegionClassifier(), prune_components=0)
    with explainer.classifier.frozen():
        explainer._prune(one, *args)
    with off.classifier.frozen():
        blob, off_args = _attempt_with_a_stray_blob(off, x)
        off._prune(blob, *off_args)
    assert torch.equal(one.hard[:, 0], region.expand(2, 32, 32))
    assert blob.hard[:, :, 22:28, 22:28].eq(1).all()


def test_pruning_keeps_a_component_the_decision_needs():
    # two blobs, both needed: the region split in halves by a one-pixel gap; neither half alone
    # gives the label, so nothing is dropped
    explainer = MedCAM(RegionClassifier())
    x = region_images(1, seed=4)
    with explainer.classifier.frozen():
        attempt, args = _attempt_with_a_stray_blob(explainer, x)
        attempt.hard[:, :, 22:28, 22:28] = 0
        attempt.hard[:, :, 8:16, 12] = 0
        split = attempt.hard.clone()
        for half in (slice(8, 12), slice(13, 16)):
            alone = split.clone()
            alone[:, :, :, half] = 0
            assert not explainer._hard_objective(alone, *args)[1].any(), "each half alone should lose the label"
        explainer._prune(attempt, *args)
    assert torch.equal(attempt.hard, split)


@pytest.mark.parametrize("prune_components", [1, 16])
def test_pruning_never_empties_a_mask(prune_components):
    # an image without the bright square: class 0 ("no region") holds with no evidence at all, so
    # (without activation matching) every component could go and the objective would fall; a mask
    # of one component is left whole, and of two, one stays (prune_components=1: the larger is tried)
    explainer = MedCAM(RegionClassifier(), target_layers=[], prune_components=prune_components)
    x = 0.3 * torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with explainer.classifier.frozen():
        attempt, args = _attempt_with_a_stray_blob(explainer, x)
        assert (args[1] == 0).all()
        attempt.hard[0, :, 8:16, 8:16] = 0  # image 0: the blob alone; image 1: square and blob
        empty = torch.zeros_like(attempt.hard)
        loss_empty, verified_empty = explainer._hard_objective(empty, *args)
        loss_now = explainer._hard_objective(attempt.hard, *args)[0]
        assert verified_empty.all() and (loss_empty < loss_now).all(), "emptying would be accepted"
        before = attempt.hard.clone()
        explainer._prune(attempt, *args)
    assert torch.equal(attempt.hard[0], before[0])
    assert attempt.hard[1].sum() == 36  # the larger 8 x 8 square dropped, the 6 x 6 blob kept
    assert attempt.hard[1, 0, 22:28, 22:28].eq(1).all()


def _stalled_attempt(explainer: MedCAM, x: torch.Tensor, keep: slice = slice(2, 30)):
    """A verified mask that keeps a large block around the region, as a stalled optimisation leaves it."""
    hard = torch.zeros(len(x), 1, *x.shape[2:])
    hard[(slice(None), slice(None)) + (keep,) * (x.ndim - 2)] = 1
    ones = torch.ones(len(x), dtype=torch.bool)
    attempt = _Attempt(soft=hard * 0.97, hard=hard, verified=ones, settled=ones.clone(), steps=torch.full((len(x),), 50),
                       stalled=ones.clone())
    s = explainer.settings.resolved(x.ndim - 2, transformer=False)
    ref_logits, ref_acts = explainer._reference(x)
    return attempt, (x, ref_logits.argmax(1), ref_logits, ref_acts, baseline_image(x, s.baseline), blurred(x), s)


def test_shrinking_cuts_a_stalled_mask_down_to_the_region():
    # a verified block of 70% of the image (77% less holes) around the 8 x 8 region the logits depend on: the ball
    # around the point the decision leans on most keeps the region and little else, scores lower
    # and is verified; one block is left whole (as pruning would: one component)
    explainer = MedCAM(RegionClassifier())
    x = region_images(2, seed=3)
    with explainer.classifier.frozen():
        attempt, args = _stalled_attempt(explainer, x)
        # in-between soft values, as an optimisation leaves them: 0.3 in single-pixel holes of the block
        holes = torch.zeros_like(attempt.hard, dtype=torch.bool)
        holes[:, :, 3:30:3, 3:30:3] = True
        attempt.hard[holes], attempt.soft[holes] = 0.0, 0.3
        before, soft_before = attempt.hard.clone(), attempt.soft.clone()
        loss_before = explainer._hard_objective(before, *args)[0]
        attempt.verified[1] = False  # an unverified mask is left as it is
        explainer._shrink(attempt, *args)
        loss_after, verified_after = explainer._hard_objective(attempt.hard, *args)
    region = _region_mask()
    shrunk = attempt.hard[0, 0]
    assert before[0].mean() > 0.65 and verified_after[0] and loss_after[0] < loss_before[0]
    assert shrunk.mean() < 0.2, f"still {float(shrunk.mean()):.0%} of the image"
    assert (shrunk * region).sum() >= 0.5 * region.sum(), "the ball lost most of the region"
    assert shrunk[20:, :].sum() == 0 and shrunk[:, 20:].sum() == 0, "kept pixels far from the region"
    # the soft mask zeroed outside the ball, kept inside it: its in-between values stay (they are
    # what the non-binary share measures); over 0.5 it is the cut mask
    soft = attempt.soft[0, 0]
    assert torch.equal(soft > 0.5, shrunk > 0.5)
    assert torch.equal(soft.unique(), torch.tensor([0.0, 0.3, 0.97]))
    kept_holes = holes[0, 0] & (soft == 0.3)
    ring = torch.nn.functional.max_pool2d(shrunk[None, None], 3, stride=1, padding=1)[0, 0] > 0  # kept pixels and their neighbours
    amid = torch.nn.functional.max_pool2d(1 - shrunk[None, None] - holes[0].float(), 3, stride=1, padding=1)[0, 0] <= 0
    assert (holes[0, 0] & amid).sum() >= 2 and (kept_holes >= (holes[0, 0] & amid)).all()  # holes amid kept pixels: inside the ball
    assert (ring >= kept_holes).all()  # none far from the cut mask
    assert torch.equal(attempt.hard[1], before[1]) and torch.equal(attempt.soft[1], soft_before[1])  # unverified: untouched


def test_shrinking_leaves_small_masks_and_can_be_turned_off():
    # a mask at or below restart_above is not shrunk; shrink_rounds=0 turns shrinking off; a mask
    # that is exactly the region (6% of the image, above restart_above) is left whole: no ball beats it
    # (on zeros; over the mean baseline the mean fills part of the region's score, and a ball of
    # 4.6% inside it is verified and scores lower: a smaller evidence, rightly taken)
    x = region_images(1, seed=3)
    for explainer, keep in ((MedCAM(RegionClassifier(), restart_above=0.8), slice(2, 30)),
                            (MedCAM(RegionClassifier(), shrink_rounds=0), slice(2, 30)),
                            (MedCAM(RegionClassifier(), baseline="zeros"), slice(8, 16))):
        with explainer.classifier.frozen():
            attempt, args = _stalled_attempt(explainer, x, keep)
            before = attempt.hard.clone()
            explainer._shrink(attempt, *args)
        assert torch.equal(attempt.hard, before)


def test_shrinking_a_volume():
    explainer = MedCAM(RegionClassifier(size=16, region=(slice(4, 8), slice(4, 8)), spatial_dims=3))
    x = 0.3 * torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    x[:, :, 4:8, 4:8, 4:8] += 0.8
    with explainer.classifier.frozen():
        attempt, args = _stalled_attempt(explainer, x, slice(1, 15))
        explainer._shrink(attempt, *args)
        assert explainer._hard_objective(attempt.hard, *args)[1].all()
    assert attempt.hard.mean() < 0.1 and attempt.hard[0, 0, 4:8, 4:8, 4:8].mean() >= 0.5
    assert attempt.hard[0, 0, 10:].sum() == 0


def test_pruning_a_volume():
    explainer = MedCAM(RegionClassifier(size=16, region=(slice(4, 8), slice(4, 8)), spatial_dims=3))
    x = 0.3 * torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    x[:, :, 4:8, 4:8, 4:8] += 0.8
    hard = torch.zeros_like(x)
    hard[:, :, 4:8, 4:8, 4:8] = 1
    hard[:, :, 12:15, 12:15, 12:15] = 1
    one = torch.ones(1, dtype=torch.bool)
    attempt = _Attempt(soft=hard.clone(), hard=hard.clone(), verified=one, settled=one.clone(), steps=torch.full((1,), 50),
                       stalled=one.clone())
    s = explainer.settings.resolved(3, transformer=False)
    with explainer.classifier.frozen():
        ref_logits, ref_acts = explainer._reference(x)
        explainer._prune(attempt, x, ref_logits.argmax(1), ref_logits, ref_acts, baseline_image(x, s.baseline), blurred(x), s)
    assert ref_logits.argmax(1).item() == 1
    assert attempt.hard.sum() == 64 and attempt.hard[0, 0, 4:8, 4:8, 4:8].eq(1).all()


def test_verify_checks_a_given_region_as_med_cam_checks_its_own_evidence(toy_result):
    """``verify``: the known region keeps the label over every check; nothing, or everything but the
    region, does not; Med-CAM's own masks get the verdict the explanation gave them."""
    x = region_images(3)
    explainer = MedCAM(RegionClassifier(), **FAST)
    region = _region_mask().expand(3, 1, 32, 32)
    assert explainer.verify(x, region).tolist() == [True, True, True]
    assert explainer.verify(x, torch.zeros(3, 1, 32, 32)).tolist() == [False, False, False]
    assert explainer.verify(x, 1 - region).tolist() == [False, False, False]
    assert torch.equal(explainer.verify(x, toy_result.mask), toy_result.verified)
    # the label asked for, not the prediction: the region is evidence for class 1, not for class 0
    assert explainer.verify(x, region, class_idx=0).tolist() == [False, False, False]
    assert explainer.verify(x, region, class_idx=[1, 0, 1]).tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 1, 32, 32\)"):
        explainer.verify(x, region[:2])
    with pytest.raises(ValueError, match="mask must be binary"):
        explainer.verify(x, region * 0.7)
