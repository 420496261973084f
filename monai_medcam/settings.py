"""Every setting of the Med-CAM objective and optimisation, with defaults that work out of the box.

The paper's weights map one to one: ``act_weight`` = lambda_act, ``kl_weight`` = lambda_KL,
``ce_weight`` = lambda_CE, ``area_weight`` = lambda_area, ``bin_weight`` = lambda_bin,
``tv_weight`` = lambda_tv, ``rob_weight`` = lambda_rob. The loss terms are normalised (means over
pixels, distances per layer made scale-free), so these numbers are comparable across image sizes
and architectures; ``docs/settings.md`` says which ones matter and why.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

from monai_medcam.backgrounds import BACKGROUNDS, BASELINES

__all__ = ["MedCAMSettings", "BY_SPATIAL_DIMS", "BY_CLASSIFIER", "as_bool", "is_whole_number"]

BOOL_FIELDS = ("hard_mask", "mine_backgrounds", "skip_vacuous", "amp", "progress")
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def as_bool(name: str, value: object) -> bool:
    """``value`` as a bool: a bool, or the word a command line gives (``python -m monai.bundle run
    ... --skip_vacuous false`` passes the string ``"false"``, which Python would take as true)."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _BOOL_WORDS:
        return _BOOL_WORDS[word]
    raise ValueError(f"{name} must be true or false, got {value!r}.")

def is_whole_number(value: object) -> bool:
    """Whether ``value`` is an integer (a Python or NumPy one), not a bool, which Python counts as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# defaults that differ between 2D images and 3D volumes (a setting left at None takes these);
# tuned on the known-evidence benchmark (docs/settings.md)
BY_SPATIAL_DIMS: dict[str, dict[int, float | str | bool]] = {
    "area_weight": {2: 20.0, 3: 120.0},
    "lr_decay": {2: 0.97, 3: 0.99},
    "restart_above": {2: 0.03, 3: 0.01},
    "late_bin_weight": {2: 100.0, 3: 0.0},
    "baseline": {2: "mean", 3: "zeros"},
    "mine_backgrounds": {2: True, 3: False},
}

# defaults that differ between vision transformers and other networks (a setting left at None
# takes these): part of a lesion can keep a ViT's token maps nearly where all of it does, so its
# activation term must pull harder for the evidence to cover the lesion (docs/settings.md)
BY_CLASSIFIER: dict[str, dict[bool, float]] = {
    "act_weight": {False: 10.0, True: 40.0},  # keyed by: is the classifier a vision transformer?
}


@dataclass
class MedCAMSettings:
    """Settings of :class:`monai_medcam.MedCAM` (pass any of them as keyword arguments).

    Args:
        act_weight: activation matching over the target layers (paper: lambda_act); ``None``: 40 for
            torchvision's and MONAI's vision transformers, 10 for other networks (:data:`BY_CLASSIFIER`).
        kl_weight: KL between the output distributions on image and evidence (lambda_KL).
        kl_temperature: temperature of that KL.
        ce_weight: cross-entropy of the explained label on the evidence (lambda_CE).
        area_weight: evidence area, mean of the mask (lambda_area); ``None``: 20 for 2D images, 120 for 3D volumes.
        bin_weight: binarisation, mean of ``m (1 - m)`` (lambda_bin).
        tv_weight: total variation of the mask (lambda_tv).
        rob_weight: cross-entropy of the label when the outside of the mask is random (lambda_rob).
        hard_mask: the fidelity and robustness terms see the binary mask through a
            straight-through estimator (forward: ``m > 0.5``; backward: identity), so what is
            optimised is what is returned. With ``False`` they see the soft mask.
        baseline: what removed pixels become in the evidence the classifier is shown: ``"mean"``
            (each image's channel means), ``"zeros"`` (the paper's ``e = m * x``, in the
            classifier's input space) or ``"blur"`` (a blurred copy); ``None``: the mean for images,
            zeros for volumes. Over any baseline but zeros, a mask is verified only if ``m x`` on
            zeros keeps the label too. On the benchmark's tuning images the mean gave tighter masks
            than zeros (energy in the lesion 0.77 against 0.70, IoU 0.59 against 0.54 over three
            seeds; docs/settings.md); on volumes it was not a clear gain.
        backgrounds: random backgrounds for the robustness term, one drawn per step:
            ``"gaussian"`` (the image's channel statistics), ``"uniform"``, ``"blur"``, ``"zeros"``,
            ``"batch"`` (another image of the batch: this one makes images depend on each other);
            a sequence, or one name.
        mine_backgrounds: where a check finds the binary mask losing the label over one of the
            verification's outsides (a background or zeros), every second step until the next
            check draws that one instead, so the mask learns to pass it. Without it one unlucky
            verification background, failed by every mask that has taken shape, leaves the image
            with the last mask that passed it: an early, large, soft one (docs/settings.md).
            ``None``: on for 2D images, off for volumes (on six tuning volumes it lowered the
            share kept under fresh backgrounds, and volumes' masks settle without it).
        steps: most optimisation steps per attempt.
        min_steps: no early stop before this many steps.
        lr: Adam's initial learning rate.
        lr_decay: the learning rate is multiplied by this every step (a fast start, then a settled mask;
            ``None``: 0.97 for 2D images, 0.99 for 3D volumes)...
        lr_floor: ...down to this fraction of ``lr``.
        check_every: steps between checks of the binary mask (verification and stability).
        stable_tol: the mask has settled when its binary and soft areas changed by less than this
            fraction of its area (at least 1% of the image) since the last check.
        binary_tol: a mask counts as settled only when at most this share of its pixels lies
            strictly between 0.01 and 0.99.
        patience: an image stops once its mask was verified and stable at this many consecutive checks.
        verify_backgrounds: K, the number of random backgrounds the binary mask must survive: a
            blurred copy of the image first, then Gaussian and uniform noise in turn (with K = 1
            the blurred copy alone, no noise).
        max_retries: retries for images whose mask is not verified; each doubles ``steps`` and
            halves ``area_weight``.
        restarts: the optimisation is chaotic and now and then stalls near "keep everything"; a
            verified mask that keeps more than ``restart_above`` of the image after pruning
            (shrunk or not) is optimised again from another seed, at most this many times (each
            restart its own seed), and the verified mask that scores lowest on the objective (the
            one pruning uses) is kept.
            Vacuous images are not restarted, nor any image when ``steps < min_steps`` (no mask
            can settle then). 0 turns restarts off...
        restart_above: ...this fraction of the image (``None``: 3% in 2D, 1% in 3D; chosen on lesions
            of 1-3% of an image and about 0.9% of a volume; where the evidence is known to be
            larger, raise it, or each such image costs up to three attempts).
        prune_components: after each attempt, the connected components of a verified binary mask
            (its this many largest) are dropped one at a time, largest first, wherever the mask
            without it is still verified, keeps the label under K fresh backgrounds too, and scores
            lower on the same objective (the robustness term averaged over the K verification
            backgrounds): a stalled optimisation often keeps a blob the decision does not need
            beside the real evidence. A mask is never emptied. 0 turns pruning off.
        shrink_rounds: after pruning, a verified binary mask larger than ``restart_above`` is
            cut down to its part within a ball around the point the decision leans on most (the
            peak of the gradient of the label's logit margin with respect to the mask), trying
            radii of 1/16 to 1/4 of the image's side, wherever that is still verified, keeps the
            label under K fresh backgrounds too and scores lower on the objective; a cut mask is
            offered smaller balls again, up to this many rounds in all. A stalled optimisation
            often keeps a large region around the evidence in one component, which pruning cannot
            split. 0 turns shrinking off.
        skip_vacuous: give images whose label holds with no evidence at all (vacuous) an empty mask
            without optimising (verified when the label also holds over the K backgrounds); pays where
            most images are negative, e.g. the tiles of a whole slide.
        sharpen_rate: the returned soft mask is ``sigmoid(beta * logits)`` with ``beta = 1 +
            sharpen_rate * step``: a steeper read-out of the same logits (the binary mask, the
            area, binarisation and TV terms and the fidelity terms' gradients are those of the
            plain sigmoid; only ``late_bin_weight``'s term sees the read-out).
            With ``binary_tol`` it makes the early stop wait until the logits are decisive, so the
            soft mask ends near-binary. 0 reads out the paper's plain sigmoid...
        sharpen_max: ...up to this ``beta``.
        late_bin_weight: binarisation of that read-out, the mean of ``s (1 - s)`` with ``s =
            sigmoid(beta * logits)`` and its own gradient, from step ``late_bin_start`` on. Late in
            a run, pixels whose logits hover just around the threshold (where the straight-through
            fidelity gradient and the area term balance, and the paper's ``m (1 - m)`` has no slope)
            are pushed to the side they are on, so the soft mask ends near-binary (``None``: 100 for
            2D images, 0 (off) for volumes, whose masks end near-binary without it). 0 turns it off...
        late_bin_start: ...from this step (by default where the learning rate reaches its floor and
            the read-out ``sharpen_max``; before it the mask takes its shape freely, and an earlier
            start can hold a mask that is still shrinking).
        mask_features: BasicUNet's six feature sizes.
        init_keep: initial mask value (start from "keep nearly everything", then prune).
        seed: seeds the mask networks and the random backgrounds; the same seed gives the same mask
            on the same machine, batch and thread set-up (the optimisation amplifies rounding: a call
            of ``torch.set_num_threads(2)`` where 2 threads were already the default changed masks;
            docs/settings.md). On CUDA only with deterministic kernels (``torch.backends.cudnn.deterministic
            = True``, which MONAI's ``set_determinism`` sets), and not even then through layers whose
            backward has no deterministic CUDA kernel (adaptive average pooling): there the masks can
            differ between runs, each verified all the same.
        verify_seed: seeds the K verification backgrounds (``None``: ``seed``). Restarts change
            ``seed`` but keep this, so every attempt is verified on the same backgrounds, those the
            result's probabilities are reported on.
        amp: bf16 autocast on CUDA (ignored on CPU).
        progress: show a progress bar over optimisation steps.
    """

    act_weight: float | None = None
    kl_weight: float = 5.0
    kl_temperature: float = 2.0
    ce_weight: float = 15.0
    area_weight: float | None = None
    bin_weight: float = 2.0
    tv_weight: float = 20.0
    rob_weight: float = 10.0
    hard_mask: bool = True
    baseline: str | None = None
    backgrounds: Sequence[str] = field(default_factory=lambda: ("gaussian", "uniform", "blur", "zeros"))
    mine_backgrounds: bool | None = None
    steps: int = 300
    min_steps: int = 40
    lr: float = 2e-2
    lr_decay: float | None = None
    lr_floor: float = 0.05
    check_every: int = 5
    stable_tol: float = 0.03
    binary_tol: float = 0.05
    patience: int = 1
    verify_backgrounds: int = 8
    max_retries: int = 1
    restarts: int = 2
    restart_above: float | None = None
    prune_components: int = 16
    shrink_rounds: int = 2
    skip_vacuous: bool = False
    sharpen_rate: float = 0.07
    sharpen_max: float = 8.0
    late_bin_weight: float | None = None
    late_bin_start: int = 100
    mask_features: Sequence[int] = (16, 16, 32, 64, 128, 16)
    init_keep: float = 0.9
    seed: int = 0
    verify_seed: int | None = None
    amp: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        for name in BOOL_FIELDS:
            if getattr(self, name) is None and name in BY_SPATIAL_DIMS:
                continue
            setattr(self, name, as_bool(name, getattr(self, name)))
        for name in ("act_weight", "kl_weight", "ce_weight", "area_weight", "bin_weight", "tv_weight", "rob_weight", "late_bin_weight"):
            value = getattr(self, name)
            if value is None and (name in BY_SPATIAL_DIMS or name in BY_CLASSIFIER):
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        for name in ("steps", "check_every", "patience", "verify_backgrounds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        for name in ("max_retries", "restarts", "prune_components", "shrink_rounds", "late_bin_start"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}.")
        above = self.restart_above
        if above is not None and (isinstance(above, bool) or not isinstance(above, numbers.Real) or not 0 <= above <= 1):
            raise ValueError(f"restart_above must be a number in [0, 1] or None, got {self.restart_above!r}.")
        if not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"min_steps must be an integer >= 0, got {self.min_steps!r}.")
        if not self.lr > 0 or not self.kl_temperature > 0:
            raise ValueError(f"lr and kl_temperature must be > 0, got {self.lr!r} and {self.kl_temperature!r}.")
        if not (self.lr_decay is None or 0 < self.lr_decay <= 1) or not 0 < self.lr_floor <= 1:
            raise ValueError(f"lr_decay and lr_floor must lie in (0, 1], got {self.lr_decay!r} and {self.lr_floor!r}.")
        if not 0 <= self.binary_tol <= 1:
            raise ValueError(f"binary_tol must lie in [0, 1], got {self.binary_tol!r}.")
        if not (math.isfinite(self.sharpen_rate) and self.sharpen_rate >= 0 and math.isfinite(self.sharpen_max) and self.sharpen_max >= 1):
            raise ValueError(f"sharpen_rate must be >= 0 and sharpen_max >= 1, got {self.sharpen_rate!r} and {self.sharpen_max!r}.")
        if not 0 < self.init_keep < 1:
            raise ValueError(f"init_keep must lie in (0, 1), got {self.init_keep!r}.")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}.")
        self.backgrounds = (self.backgrounds,) if isinstance(self.backgrounds, str) else tuple(self.backgrounds)
        unknown = [b for b in self.backgrounds if b not in BACKGROUNDS]
        if unknown or not self.backgrounds:
            raise ValueError(f"backgrounds must be a non-empty subset of {BACKGROUNDS}, got {self.backgrounds!r}.")
        if not is_whole_number(self.seed):
            raise ValueError(f"seed must be an integer (the same seed gives the same mask), got {self.seed!r}.")
        if self.verify_seed is not None and not is_whole_number(self.verify_seed):
            raise ValueError(f"verify_seed must be an integer or None, got {self.verify_seed!r}.")
        self.seed = int(self.seed)
        self.verify_seed = None if self.verify_seed is None else int(self.verify_seed)
        self.mask_features = tuple(int(f) for f in self.mask_features)
        if len(self.mask_features) != 6 or min(self.mask_features) < 1:
            raise ValueError(f"mask_features must be six positive integers, got {self.mask_features!r}.")

    def resolved(self, spatial_dims: int, *, transformer: bool) -> MedCAMSettings:
        """These settings with the defaults of 2D or 3D inputs (:data:`BY_SPATIAL_DIMS`), of a vision
        ``transformer`` or another network (:data:`BY_CLASSIFIER`), and ``seed`` for ``verify_seed``,
        in place of ``None``."""
        fill = {name: by[spatial_dims] for name, by in BY_SPATIAL_DIMS.items() if getattr(self, name) is None}
        fill.update({name: by[bool(transformer)] for name, by in BY_CLASSIFIER.items() if getattr(self, name) is None})
        if self.verify_seed is None:
            fill["verify_seed"] = self.seed
        return dataclasses.replace(self, **fill) if fill else self

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> MedCAMSettings:
        """Build settings from keyword arguments; an unknown name is a TypeError listing the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"unknown MedCAM setting(s) {unknown}; valid settings: {valid}.")
        return cls(**kwargs)  # type: ignore[arg-type]
