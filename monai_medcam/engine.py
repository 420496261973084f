"""Med-CAM's per-image optimisation: a batch of independent explainers, checked and stopped early.

Data flow for a batch ``x`` ``(B, C, *spatial)``::

    classifier(x) -> label y, reference logits and activations
    for each step:  mask nets -> soft mask m -> evidence e = m x + (1 - m) baseline
                    classifier(e), classifier(m x + (1 - m) r) -> per-image loss -> Adam step
    every check_every steps: binary mask verified?  near-binary?  stable?  -> finished images leave the batch
    verified masks -> connected components the objective does not need dropped, largest first
    verified masks still large -> cut down to a ball around the point the decision leans on most, where the objective prefers it
    images still unverified -> retried with more steps and a lower area weight
    verified masks that were still large -> restarted from another seed; the verified mask that scores lowest is kept
"""

from __future__ import annotations

import gc
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, fields, replace

import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from monai_medcam.backgrounds import baseline_image, blurred, random_background, verification_backgrounds
from monai_medcam.classifiers import FrozenClassifier, LayerSpec, TargetLayer, class_indices, index_tensor
from monai_medcam.components import connected_components, largest_components
from monai_medcam.losses import (
    ActivationMatchingLoss,
    AreaLoss,
    BinarizationLoss,
    DecisionLoss,
    OutputKLLoss,
    TotalVariationLoss,
    straight_through_binary,
)
from monai_medcam.masknet import StackedMaskNet, pad_to_multiple
from monai_medcam.metrics import non_binary_fraction
from monai_medcam.settings import MedCAMSettings, is_whole_number

__all__ = ["MedCAM", "MedCAMResult"]

logger = logging.getLogger(__name__)

MIN_SPATIAL_SIZE = 8
# said where a volume (B, C, H, W, D) is refused: the classifier may be a 2D one
VOLUME_HINT = " (a volume: for a 2D classifier explain its slices, e.g. MedCAMInferer(spatial_dims=2) after ToClassifierSpace(2, ...))"
SHRINK_RADII = (1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4)  # the balls shrinking offers, as fractions of each side
RESTART_SEED_STEP = 104729  # restart k uses seed + k * this, far from the seeds a user would compare


@contextmanager
def _without_autocast() -> Iterator[None]:
    """Autocast turned off, on CPU and CUDA: a caller's context (MONAI's evaluators with ``amp=True``)
    would otherwise run the reference pass and every check in half precision while the masks train
    in float32; the explainer's own bf16 (``amp``) is turned on inside, around its training step."""
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


@contextmanager
def _without_cudnn_autotuning() -> Iterator[None]:
    """Turn cuDNN's benchmark mode off while explaining, and restore it after.

    Benchmark mode (common in training scripts) tunes the convolution kernels for every new input
    shape. Med-CAM's batch shrinks as images finish and its checks run at other batch sizes, so it
    would tune again and again: the likely main cause of 4.8 s/image in the quality benchmark's
    first H100 run, against 0.27 s/image without it (docs/performance.md).
    """
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@dataclass
class MedCAMResult:
    """What Med-CAM found for a batch of B images (every field is per image).

    Attributes:
        mask: binary evidence mask ``(B, 1, *spatial)``, a MetaTensor with the input's metadata.
        soft_mask: the mask network's output through the steepened sigmoid (``sharpen_rate``) ``(B, 1, *spatial)``.
        label: explained class ``(B,)``.
        prob_input: probability of the label on the image ``(B,)``.
        prob_evidence: probability of the label on the binary evidence over the baseline ``(B,)``.
        prob_background: lowest probability of the label over the K random backgrounds (and zeros,
            where the baseline is not zeros) ``(B,)``.
        verified: the binary evidence gives the label over the baseline, on zeros (``m x`` alone;
            a separate check only where the baseline is not zeros) and under all K random
            backgrounds ``(B,)``.
        settled: the kept attempt ended at a check where its mask was verified, near-binary and
            stable (possibly the last check), not because its steps ran out ``(B,)``. An unsettled
            mask comes from an optimisation that was still moving: its soft mask can be far from
            binary (raise ``steps``). Images skipped as vacuous (``skip_vacuous``) count as settled.
        vacuous: the classifier already gives the label with no evidence at all ``(B,)``.
        area: fraction of pixels in the binary mask ``(B,)``.
        steps: optimisation steps spent, over all attempts ``(B,)``.
        retries: attempts after the first (retries of unverified masks and restarts of large ones) ``(B,)``.
        seconds: wall time of the batch divided by B (the amortised time per image) ``(B,)``.
    """

    mask: torch.Tensor
    soft_mask: torch.Tensor
    label: torch.Tensor
    prob_input: torch.Tensor
    prob_evidence: torch.Tensor
    prob_background: torch.Tensor
    verified: torch.Tensor
    settled: torch.Tensor
    vacuous: torch.Tensor
    area: torch.Tensor
    steps: torch.Tensor
    retries: torch.Tensor
    seconds: torch.Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @classmethod
    def concat(cls, results: Sequence[MedCAMResult]) -> MedCAMResult:
        """One result for the images of several, in order (e.g. the chunks of a large batch)."""
        if len(results) == 1:
            return results[0]
        names = [f.name for f in fields(cls)]
        return cls(**{name: torch.cat([getattr(r, name) for r in results]) for name in names})

    def summary(self) -> list[dict[str, float | int | bool]]:
        """One plain dictionary per image, for tables and CSV files."""
        return [
            {
                "label": int(self.label[i]),
                "prob_input": float(self.prob_input[i]),
                "prob_evidence": float(self.prob_evidence[i]),
                "prob_background": float(self.prob_background[i]),
                "area": float(self.area[i]),
                "verified": bool(self.verified[i]),
                "settled": bool(self.settled[i]),
                "vacuous": bool(self.vacuous[i]),
                "steps": int(self.steps[i]),
                "retries": int(self.retries[i]),
                "seconds": float(self.seconds[i]),
            }
            for i in range(len(self))
        ]


def _listed(names: list[str], which: torch.Tensor) -> str:
    """``"[a, c]"``: the names where ``which`` ``(B,)`` is True."""
    return "[" + ", ".join(names[i] for i in which.nonzero().flatten().tolist()) + "]"


def _flags(idx: torch.Tensor, count: int) -> torch.Tensor:
    """``(count,)`` bool, True at ``idx``."""
    flags = torch.zeros(count, dtype=torch.bool)
    flags[idx.cpu()] = True
    return flags


def _rows(idx: torch.Tensor, *values: torch.Tensor | list[torch.Tensor]) -> tuple:
    """Each value's rows ``idx`` (for a list of tensors, such as the reference activations, each tensor's)."""
    return tuple([v[idx] for v in value] if isinstance(value, list) else value[idx] for value in values)


def with_meta_of(out: MetaTensor, source: MetaTensor) -> MetaTensor:
    """``out`` with a deep copy of ``source``'s metadata and applied operations (its affine, its
    lists): evidence whose meta is changed leaves the image's as it was."""
    out.meta = deepcopy(dict(source.meta))
    out.applied_operations = deepcopy(list(source.applied_operations))
    out.is_batch = source.is_batch
    return out


@dataclass
class _Attempt:
    """Per-image outcome of one optimisation attempt (tensors of length B on the input's device)."""

    soft: torch.Tensor
    hard: torch.Tensor
    verified: torch.Tensor
    settled: torch.Tensor
    steps: torch.Tensor
    stalled: torch.Tensor  # verified, and larger than restart_above after pruning, before shrinking: worth a restart

    OUTCOME = ("soft", "hard", "verified", "settled", "stalled")  # what a later attempt replaces; steps add up


class MedCAM:
    """Med-CAM: minimal, decision-preserving evidence masks for a frozen classifier.

    For each image ``x`` a BasicUNet is trained from scratch to output a near-binary mask ``m``
    such that the evidence ``e = m * x`` alone reproduces the classifier's activations, output
    distribution and label, is small, crisp and contiguous, and keeps the label when everything
    outside the mask is random. A batch is B independent explainers optimised together.

    Suhail, Anand, Sethi, "Med-CAM: Minimal Evidence for Explaining Medical Decision Making",
    arXiv:2604.13695, 2026.

    Args:
        nn_module: the frozen classifier, ``(B, C, *spatial) -> (B, K)`` logits (or one logit).
            It is put in eval mode without parameter gradients while explaining and restored after.
        target_layers: ``"auto"`` (per-architecture defaults), or names, modules, callables or
            :class:`~monai_medcam.classifiers.TargetLayer` objects; ``[]`` turns activation matching off.
        layer_weights: optional per-layer weights ``alpha_l``.
        layer_distances: optional per-layer distances, ``"mse"`` or ``"cosine"``.
        settings: any field of :class:`~monai_medcam.settings.MedCAMSettings` (``steps``,
            ``area_weight``, ``baseline``, ``seed``, ...).

    Examples::

        import torch
        from monai.networks.nets import DenseNet121
        from monai_medcam import MedCAM

        net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
        explainer = MedCAM(net, target_layers="auto", steps=100)
        mask = explainer(torch.rand(2, 1, 64, 64))          # (2, 1, 64, 64) binary MetaTensor
        result = explainer.explain(torch.rand(2, 1, 64, 64))
        result.verified, result.area
    """

    def __init__(
        self,
        nn_module: torch.nn.Module,
        target_layers: str | Sequence[LayerSpec | TargetLayer] = "auto",
        layer_weights: Sequence[float] | None = None,
        layer_distances: Sequence[str] | None = None,
        **settings: object,
    ) -> None:
        self.settings = MedCAMSettings.from_kwargs(**settings)
        self.classifier = FrozenClassifier(nn_module, target_layers, layer_weights, layer_distances)
        self.nn_module = nn_module
        self._fits: int | None = None  # the most images optimised together that fitted in GPU memory, once one did not

    def __call__(self, x: torch.Tensor, class_idx: int | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Binary evidence masks ``(B, 1, *spatial)`` for ``x`` ``(B, C, *spatial)``, as a MetaTensor."""
        return self.explain(x, class_idx).mask

    def resolved_settings(self, spatial_dims: int) -> MedCAMSettings:
        """The settings used on inputs with ``spatial_dims`` (2 or 3): ``None`` fields take the
        defaults of that dimensionality and of this explainer's classifier (:meth:`MedCAMSettings.resolved`)."""
        return self.settings.resolved(spatial_dims, transformer=self.classifier.is_transformer)

    # -- input checks ---------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            raise ValueError(
                "Med-CAM optimises a mask network and cannot run under torch.inference_mode(); "
                "call it outside inference mode (torch.no_grad() is fine)."
            )
        if any(p.is_inference() for p in self.nn_module.parameters()):
            raise ValueError(
                "the classifier's parameters were created under torch.inference_mode() and cannot take part "
                "in gradient computation; load the classifier outside inference mode."
            )
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"input must be a torch.Tensor (B, C, H, W[, D]), got {type(x).__name__}.")
        if x.ndim not in (4, 5):
            raise ValueError(f"input must have shape (B, C, H, W) or (B, C, H, W, D); got {x.ndim} dims {tuple(x.shape)}.")
        if x.shape[0] == 0:
            raise ValueError(f"input is an empty batch: shape {tuple(x.shape)}.")
        if min(x.shape[2:]) < MIN_SPATIAL_SIZE:
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} is too small: each side must be >= {MIN_SPATIAL_SIZE}"
                             f"{VOLUME_HINT if x.ndim == 5 else ''}.")
        data = x.as_tensor() if isinstance(x, MetaTensor) else x
        if data.is_inference():
            data = data.clone()
        data = data.detach()
        if data.dtype != torch.float32:  # integers, float64 (numpy's default), float16: the mask network is float32
            data = data.float()
        if not torch.isfinite(data).all():
            bad = (~torch.isfinite(data)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(f"input holds NaN or Inf values (images {bad} of the batch).")
        devices = {p.device for p in self.nn_module.parameters()}
        if devices and data.device not in devices:
            raise ValueError(f"input is on {data.device} but the classifier is on {sorted(map(str, devices))}; move one.")
        return data

    def _labels(self, class_idx: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        count, classes = logits.shape
        if class_idx is None:
            return logits.argmax(1)
        return class_indices(class_idx, count, logits.device, "class_idx", classes)

    def _reference(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        try:
            with torch.no_grad():
                logits, acts = self.classifier.logits_and_activations(x)
        except torch.cuda.OutOfMemoryError:
            raise  # explain() halves the batch
        except RuntimeError as err:
            if "ALLOC_FAILED" in str(err) or "out of memory" in str(err).lower():  # cuBLAS/cuDNN out of memory
                raise torch.cuda.OutOfMemoryError(str(err)) from err
            raise ValueError(self._refused(x, err)) from err
        except AssertionError as err:  # torchvision's ViT asserts its input size
            raise ValueError(self._refused(x, err)) from err
        return logits.float(), [a.detach() for a in acts]

    @staticmethod
    def _refused(x: torch.Tensor, err: Exception) -> str:
        hint = VOLUME_HINT if x.ndim == 5 else ""
        return f"the classifier refused an input of shape {tuple(x.shape)}{hint}: {str(err) or type(err).__name__}"

    # -- the public entry point -----------------------------------------------------------------
    def explain(
        self,
        x: torch.Tensor,
        class_idx: int | Sequence[int] | torch.Tensor | None = None,
        batch_size: int | None = None,
        names: Sequence[str] | None = None,
    ) -> MedCAMResult:
        """Explain ``x`` ``(B, C, *spatial)``; ``class_idx`` (one for all or one per image) defaults to the prediction.

        At most ``batch_size`` images are optimised together (``None``: all of ``x``). A batch that
        does not fit in GPU memory is explained in halves (then quarters, ...), and later calls
        start from the size that fitted. The images are independent explainers, but the kernels
        oneDNN and cuDNN pick by batch size round differently and the optimisation amplifies it: an
        image's mask can differ with ``batch_size``, its batch-mates or a split, each mask verified
        (the same set-up gives the same masks). ``names`` (one per image) are how the log calls the
        images; their indices in ``x`` by default. An autocast context around the call does not
        reach the explainer (``amp`` decides its precision).
        """
        data = self._check_input(x)
        if batch_size is not None and (not is_whole_number(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        names = [str(i) for i in range(data.shape[0])] if names is None else [str(n) for n in names]
        if len(names) != data.shape[0]:
            raise ValueError(f"names gives {len(names)} names for a batch of {data.shape[0]} images.")
        if class_idx is not None:  # one per image, so that each part of the batch takes its own
            class_idx = index_tensor(class_idx)  # not numbers: refused before any work
            if class_idx.numel() not in (1, data.shape[0]):
                raise ValueError(f"class_idx gives {class_idx.numel()} labels for a batch of {data.shape[0]} images.")
            class_idx = class_idx.expand(data.shape[0])
        start = time.perf_counter()
        with _without_cudnn_autotuning(), _without_autocast():
            result = self._explain_in_parts(data, class_idx, int(batch_size or data.shape[0]), names)
        result.seconds = torch.full((data.shape[0],), (time.perf_counter() - start) / data.shape[0], dtype=torch.float32, device=data.device)
        result.mask = MetaTensor(result.mask)
        if isinstance(x, MetaTensor):
            with_meta_of(result.mask, x)
        return result

    def verify(
        self, x: torch.Tensor, mask: torch.Tensor, class_idx: int | Sequence[int] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Whether binary masks pass the check Med-CAM's own evidence must pass, ``(B,)`` bool.

        The evidence ``mask x`` keeps the label over the baseline, under the K verification
        backgrounds and, where the baseline is not zeros, on zeros (``verified`` of
        :class:`MedCAMResult`). Use it on a region drawn by hand or a known lesion: where it is
        False, no verified Med-CAM mask can be exactly that region.

        Args:
            x: images ``(B, C, *spatial)``.
            mask: binary masks ``(B, 1, *spatial)`` (values 0 and 1).
            class_idx: the label to keep (one for all or one per image); defaults to the prediction.
        """
        data = self._check_input(x)
        m = mask.as_tensor() if isinstance(mask, MetaTensor) else mask
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (data.shape[0], 1, *data.shape[2:]):
            raise ValueError(f"mask must have shape {(data.shape[0], 1, *data.shape[2:])} for input {tuple(data.shape)}, "
                             f"got {tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}.")
        m = m.detach().to(data.device, data.dtype)
        if not ((m == 0) | (m == 1)).all():
            raise ValueError("mask must be binary (values 0 and 1); threshold a soft mask or saliency map first.")
        s = self.resolved_settings(data.ndim - 2)
        with self.classifier.frozen(), torch.no_grad(), _without_cudnn_autotuning(), _without_autocast():  # as explain()
            label = self._labels(class_idx, self._reference(data)[0])
            checks = self._check_logits(data, m, baseline_image(data, s.baseline), blurred(data), s)
        return self._keeps_label(checks, label)

    def _explain_in_parts(self, data: torch.Tensor, class_idx: torch.Tensor | None, batch_size: int, names: list[str]) -> MedCAMResult:
        """Parts of at most ``batch_size`` and ``self._fits`` images, one after the other; once a part
        runs out of GPU memory, it and the images after it are explained in parts of half its size.
        ``class_idx``: one per image ``(B,)``, or ``None``; ``names``: the images' names in the log."""
        count = data.shape[0]
        size = min(count, batch_size, self._fits or count)
        parts = []
        for begin in range(0, count, size):
            part = slice(begin, begin + size)
            try:
                parts.append(self._explain(data[part], None if class_idx is None else class_idx[part], names[part]))
                continue
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
            # past the except block: the exception's traceback, which holds the failed attempt's mask
            # networks, optimiser state and activations, is gone before the smaller parts start
            gc.collect()
            torch.cuda.empty_cache()
            self._fits = max(1, size // 2)
            logger.warning("out of GPU memory with %d images at once; explaining them %d at a time.", size, self._fits)
            rest = slice(begin, None)  # the later parts would not fit either
            parts.append(self._explain_in_parts(data[rest], None if class_idx is None else class_idx[rest], batch_size, names[rest]))
            break
        return MedCAMResult.concat(parts)

    def _explain(self, data: torch.Tensor, class_idx: int | Sequence[int] | torch.Tensor | None, names: list[str]) -> MedCAMResult:
        """:meth:`explain` for one batch that is optimised together (``mask`` a plain tensor, ``seconds``
        unset); ``names``: the images' names in the log."""
        s = self.resolved_settings(data.ndim - 2)
        with self.classifier.frozen(), torch.enable_grad():
            ref_logits, ref_acts = self._reference(data)
            label = self._labels(class_idx, ref_logits)
            base = baseline_image(data, s.baseline)
            x_blurred = blurred(data)
            with torch.no_grad():
                empty_logits = self.classifier.logits(base).float()
            vacuous = empty_logits.argmax(1) == label
            if vacuous.any():
                logger.log(
                    logging.INFO if s.skip_vacuous else logging.WARNING,
                    "images %s: the classifier gives label %s with no evidence at all (vacuous case); the mask is %s.",
                    _listed(names, vacuous),
                    label[vacuous].tolist(),
                    "left empty (skip_vacuous)" if s.skip_vacuous else "then held to the robustness check only",
                )
            skipped = vacuous if s.skip_vacuous else torch.zeros_like(vacuous)
            attempt = self._optimise_unless_skipped(data, label, ref_logits, ref_acts, base, x_blurred, s, skipped)
            retries = torch.zeros_like(attempt.steps)

            def try_again(todo: torch.Tensor, settings: MedCAMSettings, only_if_better: bool) -> None:
                """Optimise the images ``todo`` once more; take the new masks (all, or the verified ones
                that score lower on the objective than the masks they would replace). Every attempt
                is verified on the same backgrounds (``s.verify_seed``)."""
                inputs = _rows(todo, data, label, ref_logits, ref_acts, base, x_blurred)
                again = self._optimise(*inputs, settings)
                attempt.steps[todo] += again.steps
                retries[todo] += 1
                take = torch.ones_like(again.verified)
                if only_if_better:
                    with torch.no_grad():
                        new, old = (self._hard_objective(hard, *inputs, s)[0] for hard in (again.hard, attempt.hard[todo]))
                    take = again.verified & (new < old)
                for name in _Attempt.OUTCOME:
                    getattr(attempt, name)[todo[take]] = getattr(again, name)[take]

            for retry in range(1, s.max_retries + 1):
                todo = (~attempt.verified & ~skipped).nonzero().flatten()
                if len(todo) == 0:
                    break
                harder = replace(s, steps=s.steps * 2**retry, area_weight=s.area_weight * 0.5**retry)
                logger.info("retrying images %s, unverified, with steps=%d, area_weight=%g", _listed(names, _flags(todo, len(names))),
                            harder.steps, harder.area_weight)
                try_again(todo, harder, only_if_better=False)
            # with fewer steps than min_steps no mask can settle: a large one is unfinished, not stalled
            restarts = s.restarts if s.steps >= s.min_steps else 0
            for restart in range(1, restarts + 1):
                todo = (attempt.stalled & ~vacuous).nonzero().flatten()  # a shrunk mask too: a restart may do better
                if len(todo) == 0:
                    break
                seed = s.seed + RESTART_SEED_STEP * restart
                logger.info("restarting images %s, whose evidence keeps over %g of the image, with seed %d",
                            _listed(names, _flags(todo, len(names))), s.restart_above, seed)
                try_again(todo, replace(s, seed=seed), only_if_better=True)
            if not attempt.settled.all():
                logger.info("images %s ran out of steps before their masks settled (soft masks may be far from binary; "
                            "raise steps)", _listed(names, ~attempt.settled))
            with torch.no_grad():
                prob_input = torch.softmax(ref_logits, 1).gather(1, label[:, None])[:, 0]
                checks = torch.softmax(self._check_logits(data, attempt.hard, base, x_blurred, s), 2)
                probs = checks.gather(2, label[None, :, None].expand(len(checks), -1, 1))[..., 0]
                prob_evidence, prob_background = probs[0], probs[1:].amin(0)
                # the verdict on the masks returned, in this batch: the one the probabilities and verify() give
                # (checked during the optimisation on the images still running, whose rounding can differ)
                attempt.verified = self._keeps_label(checks, label)
        return MedCAMResult(
            mask=attempt.hard,
            soft_mask=attempt.soft,
            label=label,
            prob_input=prob_input,
            prob_evidence=prob_evidence,
            prob_background=prob_background,
            verified=attempt.verified,
            settled=attempt.settled,
            vacuous=vacuous,
            area=attempt.hard.flatten(1).mean(1),
            steps=attempt.steps,
            retries=retries,
            seconds=torch.zeros(data.shape[0], dtype=torch.float32, device=data.device),
        )

    def _optimise_unless_skipped(
        self, data, label, ref_logits, ref_acts, base, x_blurred, s: MedCAMSettings, skipped: torch.Tensor
    ) -> _Attempt:
        """Optimise the images not ``skipped``; a skipped (vacuous) image keeps an empty mask, verified
        when the label holds with no evidence over the baseline and every random background."""
        if not skipped.any():
            return self._optimise(data, label, ref_logits, ref_acts, base, x_blurred, s)
        empty = torch.zeros_like(data[:, :1])
        attempt = _Attempt(
            soft=empty.clone(), hard=empty.clone(), verified=torch.zeros_like(skipped), settled=skipped.clone(),
            steps=torch.zeros_like(label), stalled=torch.zeros_like(skipped),
        )
        idx = skipped.nonzero().flatten()
        with torch.no_grad():
            checks = self._check_logits(data[idx], empty[idx], base[idx], x_blurred[idx], s)
        attempt.verified[idx] = self._keeps_label(checks, label[idx])
        todo = (~skipped).nonzero().flatten()
        if len(todo):
            done = self._optimise(*_rows(todo, data, label, ref_logits, ref_acts, base, x_blurred), s)
            for name in (*_Attempt.OUTCOME, "steps"):
                getattr(attempt, name)[todo] = getattr(done, name)
        return attempt

    # -- verification ---------------------------------------------------------------------------
    @staticmethod
    def _outsides(x: torch.Tensor, base: torch.Tensor, x_blurred: torch.Tensor, s: MedCAMSettings, draw: int = 0) -> list[torch.Tensor]:
        """What fills the outside of the mask in the checks, each shaped like ``x``: the baseline, then
        the K :func:`~monai_medcam.backgrounds.verification_backgrounds` (``draw`` 0 those of the
        verification, another ``draw`` K fresh ones), then, in the verification (``draw`` 0) where
        the baseline is not zeros, zeros: the paper's evidence ``m x`` alone must keep the label too
        (fresh draws leave it out: it is the same every draw)."""
        seed = s.verify_seed + 7919 * (1 + draw)  # s from resolved(): verify_seed resolved there, once
        outsides = [base, *verification_backgrounds(x, s.verify_backgrounds, seed, x_blurred)]
        if draw == 0 and s.baseline != "zeros":
            outsides.append(torch.zeros_like(x))
        return outsides

    @staticmethod
    def _keeps_label(checks: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: ``label`` is the prediction in every check of ``checks`` ``(checks, B, classes)``
        (:meth:`_check_logits`): the verdict of the verification, wherever it is made."""
        return (checks.argmax(2) == label).all(0)

    def _check_logits(
        self, x: torch.Tensor, hard: torch.Tensor, base: torch.Tensor, x_blurred: torch.Tensor, s: MedCAMSettings, draw: int = 0,
        outsides: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits ``(1 + K, B, classes)`` of the binary evidence: on the baseline, then on each of K
        backgrounds, and for ``draw`` 0 on zeros unless the baseline is zeros (:meth:`_outsides`, or
        ``outsides`` when given; ``K + 2`` rows then), in one classifier pass."""
        outsides = self._outsides(x, base, x_blurred, s, draw) if outsides is None else outsides
        variants = [hard * x + (1 - hard) * r for r in outsides]
        return self.classifier.logits(torch.cat(variants)).float().view(len(variants), x.shape[0], -1)

    # -- one optimisation attempt ---------------------------------------------------------------
    def _optimise(
        self,
        x: torch.Tensor,
        label: torch.Tensor,
        ref_logits: torch.Tensor,
        ref_acts: list[torch.Tensor],
        base: torch.Tensor,
        x_blurred: torch.Tensor,
        s: MedCAMSettings,
    ) -> _Attempt:
        count, device = x.shape[0], x.device
        net = StackedMaskNet(count, x.ndim - 2, x.shape[1], s.mask_features, s.init_keep, s.seed, device)
        optimizer = torch.optim.Adam(net.parameters(), lr=s.lr, fused=True)  # one kernel for all parameters
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(s.lr_decay**i, s.lr_floor))
        x_padded, crop = pad_to_multiple(x)
        generator = torch.Generator(device=device).manual_seed(s.seed)
        kinds = random.Random(s.seed)

        act_loss = ActivationMatchingLoss(self.classifier.layers, reduction="none") if self.classifier.layers else None
        kl_loss = OutputKLLoss(s.kl_temperature, reduction="none")
        decision = DecisionLoss(reduction="none")
        area, crisp, tv = AreaLoss(reduction="none"), BinarizationLoss(reduction="none"), TotalVariationLoss(reduction="none")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=s.amp and device.type == "cuda")

        soft_out = torch.zeros(count, 1, *x.shape[2:], dtype=x.dtype, device=device)
        hard_out = torch.zeros_like(soft_out)
        verified_out = torch.zeros(count, dtype=torch.bool, device=device)
        settled_out = torch.zeros_like(verified_out)
        steps_out = torch.full((count,), s.steps, dtype=torch.long, device=device)
        active = torch.arange(count, device=device)
        # per image: an outside its binary mask lost the label over at the last check (mining only)
        mined = torch.zeros_like(x) if s.mine_backgrounds else None
        has_mined = torch.zeros(count, dtype=torch.bool, device=device)
        previous = None
        calm = torch.zeros(count, dtype=torch.long, device=device)  # consecutive checks verified and stable

        def sharpness(step: int) -> float:  # the read-out steepens over the steps, so the soft mask ends near-binary
            return min(1.0 + s.sharpen_rate * step, s.sharpen_max)

        bar = tqdm(total=s.steps, desc="Med-CAM", unit="step", disable=not s.progress, leave=False)
        for step in range(1, s.steps + 1):
            xa, ba, ya = x[active], base[active], label[active]
            with autocast:
                mask_logits = net(x_padded[active])[crop].float()
                plain = torch.sigmoid(mask_logits)  # what the area, binarisation and TV terms act on
                # the mask read out through a steepening sigmoid (gradient: the plain one's); same binary mask
                steep = torch.sigmoid(sharpness(step) * mask_logits)  # with its own gradient: late_bin_weight's term
                soft = plain + (steep - plain).detach()
                used = straight_through_binary(soft) if s.hard_mask else soft
                kind = kinds.choice(s.backgrounds)
                r = random_background(xa, kind, generator, x_blurred[active])
                if s.mine_backgrounds and step % 2 == 0:  # every second step: the outside each mask last lost the label over
                    r = torch.where(has_mined[active].view(-1, *(1,) * (x.ndim - 1)), mined[active], r)
                evidence = used * xa + (1 - used) * ba
                outside_random = used * xa + (1 - used) * r
                logits, acts = self.classifier.logits_and_activations(torch.cat([evidence, outside_random]))
            n = len(active)
            logits_e, logits_r = logits[:n].float(), logits[n:].float()
            loss = (
                s.kl_weight * kl_loss(ref_logits[active], logits_e)
                + s.ce_weight * decision(logits_e, ya)
                + s.rob_weight * decision(logits_r, ya)
                + s.area_weight * area(plain)
                + s.bin_weight * crisp(plain)
                + s.tv_weight * tv(plain)
            )
            if s.late_bin_weight and step >= s.late_bin_start:  # late: push hovering pixels to their side
                loss = loss + s.late_bin_weight * crisp(steep)
            if act_loss is not None:
                loss = loss + s.act_weight * act_loss([a[active] for a in ref_acts], [a[:n] for a in acts])
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            schedule.step()
            bar.update(1)

            if step % s.check_every and step != s.steps:
                continue
            with torch.no_grad():
                hard = (soft.detach() > 0.5).float()
                outsides = self._outsides(xa, ba, x_blurred[active], s)
                checks = self._check_logits(xa, hard, ba, x_blurred[active], s, outsides=outsides)
                ok = self._keeps_label(checks, ya)
                if s.mine_backgrounds:
                    self._mine(checks, ya, outsides, active, mined, has_mined)
                soft_out[active[ok]] = soft.detach()[ok]
                hard_out[active[ok]] = hard[ok]
                verified_out[active[ok]] = True
                unverified_yet = ~verified_out[active]
                soft_out[active[unverified_yet]] = soft.detach()[unverified_yet]
                hard_out[active[unverified_yet]] = hard[unverified_yet]
                areas = (hard.flatten(1).mean(1), soft.detach().flatten(1).mean(1))
                if previous is not None:
                    near_binary = non_binary_fraction(soft.detach()) <= s.binary_tol  # values within 0.01 of 0 or 1
                    calm = torch.where(ok & near_binary & self._stable(*areas, previous, s.stable_tol), calm + 1, 0)
                done = (calm >= s.patience) & (step >= s.min_steps)
                steps_out[active[done]] = step
                settled_out[active[done]] = True
                keep = (~done).nonzero().flatten()
                previous, calm = (areas[0][keep], areas[1][keep]), calm[keep]
            bar.set_postfix_str(f"{count - len(keep)}/{count} images done")
            if len(keep) == 0:
                break
            if len(keep) < n:
                self._drop_finished(net, optimizer, keep)
                active = active[keep]
        bar.close()
        attempt = _Attempt(soft=soft_out, hard=hard_out, verified=verified_out, settled=settled_out, steps=steps_out,
                           stalled=torch.zeros_like(verified_out))
        self._prune(attempt, x, label, ref_logits, ref_acts, base, x_blurred, s)
        attempt.stalled = attempt.verified & (attempt.hard.flatten(1).mean(1) > s.restart_above)
        self._shrink(attempt, x, label, ref_logits, ref_acts, base, x_blurred, s)
        return attempt

    @staticmethod
    def _mine(
        checks: torch.Tensor, label: torch.Tensor, outsides: list[torch.Tensor], active: torch.Tensor, mined: torch.Tensor,
        has_mined: torch.Tensor,
    ) -> None:
        """Keep, in ``mined`` ``(count, C, *spatial)`` (``has_mined`` ``(count,)``), the first outside
        other than the baseline over which each active image's binary mask lost ``label`` at this
        check (``checks`` ``(rows, n, classes)`` of ``outsides``); images that lost none forget theirs.
        The baseline's row is the fidelity terms' business."""
        lost = checks.argmax(2) != label
        lost[0] = False
        any_lost, first = lost.any(0), lost.float().argmax(0)  # first: the first row lost (0 where none)
        pick = mined[active]
        for row in range(1, len(outsides)):  # no host sync: the GPU's steps run ahead of the host
            take = (any_lost & (first == row)).view(-1, *(1,) * (pick.ndim - 1))
            pick = torch.where(take, outsides[row], pick)
        mined[active], has_mined[active] = pick, any_lost

    # -- pruning: a discrete descent on the same objective, component by component ---------------
    def _prune(
        self,
        attempt: _Attempt,
        x: torch.Tensor,
        label: torch.Tensor,
        ref_logits: torch.Tensor,
        ref_acts: list[torch.Tensor],
        base: torch.Tensor,
        x_blurred: torch.Tensor,
        s: MedCAMSettings,
    ) -> None:
        """Drop connected components of the verified binary masks, in place, one at a time and
        largest first (at most ``s.prune_components`` per mask), wherever the mask without it is
        still verified, keeps the label under K fresh backgrounds too (:meth:`_judge`), and scores
        lower on the objective (:meth:`_hard_objective`). A mask is never emptied. The soft mask
        is zeroed where a component was dropped."""
        if s.prune_components == 0 or not attempt.verified.any():
            return

        def inputs(idx: torch.Tensor) -> tuple:  # what _hard_objective needs, for the images idx
            return *_rows(idx, x, label, ref_logits, ref_acts, base, x_blurred), s

        with torch.no_grad():
            labels = connected_components(attempt.hard)
            order = largest_components(labels, max(2, s.prune_components))  # (B, n) component labels, 0: none
            several = order[:, 1] > 0  # a mask of one component is left whole
            order = order[:, : s.prune_components]
            order[~(attempt.verified & several)] = 0
            score = torch.full_like(ref_logits[:, 0], float("inf"))
            todo = order[:, 0].nonzero().flatten()
            if len(todo):
                score[todo] = self._hard_objective(attempt.hard[todo], *inputs(todo))[0]
            dropped = torch.zeros_like(label)
            for rank in range(order.shape[1]):
                todo = order[:, rank].nonzero().flatten()
                if len(todo) == 0:
                    break
                keep = labels[todo] != order[todo, rank].view(-1, *[1] * (labels.ndim - 1))
                candidate = attempt.hard[todo] * keep
                loss, verified = self._judge(candidate, inputs(todo))
                better = verified & (loss < score[todo]) & (candidate.flatten(1).amax(1) > 0)
                take = todo[better]
                attempt.hard[take] = candidate[better]
                attempt.soft[take] = attempt.soft[take] * keep[better]
                score[take] = loss[better]
                dropped[take] += 1
        if dropped.any():
            logger.debug("dropped %d component(s) the objective does not need from %d mask(s)", int(dropped.sum()), int((dropped > 0).sum()))

    # -- shrinking: cut a large verified mask down around the point the decision leans on most ---
    def _shrink(
        self,
        attempt: _Attempt,
        x: torch.Tensor,
        label: torch.Tensor,
        ref_logits: torch.Tensor,
        ref_acts: list[torch.Tensor],
        base: torch.Tensor,
        x_blurred: torch.Tensor,
        s: MedCAMSettings,
    ) -> None:
        """Replace verified binary masks larger than ``s.restart_above``, in place, by their part
        within a ball around the point the decision leans on most, where that scores lower on the
        objective; up to ``s.shrink_rounds`` rounds.

        The point is the peak, inside the mask, of the gradient of the label's logit margin with
        respect to the mask (over the evidence and the K verification backgrounds), averaged over
        a window of about a tenth of each side. The balls' radii are :data:`SHRINK_RADII` of each
        side (ellipsoids where the sides differ). A candidate is taken when it is verified, keeps
        the label under K fresh backgrounds too, and scores lowest on :meth:`_hard_objective`,
        below the mask; a cut mask is offered smaller balls around its own peak in the next round,
        whatever its size, and an image stops once no ball beats its mask. The soft mask is zeroed
        outside the ball, so that it stays the evidence returned (its part over 0.5 is the cut
        mask); its values below 0.5 inside the ball are kept, as the optimisation left them.
        """
        if s.shrink_rounds == 0:
            return
        spatial = x.shape[2:]
        pool = torch.nn.functional.avg_pool2d if len(spatial) == 2 else torch.nn.functional.avg_pool3d
        window = [max(1, round(n / 20)) for n in spatial]
        # coordinates as fractions of each side, so a ball is an ellipsoid on a non-cubic grid
        grid = torch.stack(torch.meshgrid(*[torch.arange(n, device=x.device, dtype=torch.float32) / n for n in spatial], indexing="ij"))
        active = attempt.verified & (attempt.hard.flatten(1).mean(1) > s.restart_above)
        for _ in range(s.shrink_rounds):  # a mask cut in one round is offered smaller balls in the next
            todo = active.nonzero().flatten()
            if len(todo) == 0:
                break
            inputs = (*_rows(todo, x, label, ref_logits, ref_acts, base, x_blurred), s)
            xs, labels, bases, blurs = inputs[0], inputs[1], inputs[4], inputs[5]
            hard = attempt.hard[todo]
            mask = hard.clone().requires_grad_(True)
            support = torch.zeros_like(hard)
            for outside in self._outsides(xs, bases, blurs, s):  # one pass each: the memory of B images, not (1 + K) B
                with torch.enable_grad():
                    logits = self.classifier.logits(mask * xs + (1 - mask) * outside).float()
                    own = logits.gather(1, labels[:, None])[:, 0]
                    margin = own - logits.scatter(1, labels[:, None], float("-inf")).amax(1)
                    support += torch.autograd.grad(margin.sum(), mask)[0]
            with torch.no_grad():
                support = pool(support, [2 * w + 1 for w in window], stride=1, padding=window, count_include_pad=False)
                peak = torch.where(hard > 0.5, support, torch.full_like(support, float("-inf"))).flatten(1).argmax(1)
                centre = grid.flatten(1)[:, peak].T.reshape(len(todo), len(spatial), *[1] * len(spatial))  # (B, dims, 1, ...)
                distance = (grid[None] - centre).square().sum(1, keepdim=True).sqrt()  # (B, 1, *spatial), in sides
                score = self._hard_objective(hard, *inputs)[0]
                best, chosen, ball = score.clone(), hard.clone(), torch.ones_like(hard)
                for radius in SHRINK_RADII:
                    inside = (distance <= radius).float()
                    candidate = hard * inside
                    loss, verified = self._judge(candidate, inputs)
                    better = verified & (loss < best)
                    best[better], chosen[better], ball[better] = loss[better], candidate[better], inside[better]
                improved = best < score
                take = todo[improved]
                attempt.hard[take] = chosen[improved]
                attempt.soft[take] = attempt.soft[take] * ball[improved]
                active[todo[~improved]] = False

    def _judge(self, candidate: torch.Tensor, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_hard_objective` of candidate masks ``(B, 1, *spatial)``, and whether each keeps the
        label on the K verification backgrounds (and zeros, as verified says) and on K fresh ones, both ``(B,)``. Choosing among
        masks by the verification's own backgrounds would pick those that just pass them (the
        blurred copy is in both sets). ``inputs``: what ``_hard_objective`` takes after the mask."""
        loss, verified = self._hard_objective(candidate, *inputs)
        x, label, _, _, base, x_blurred, s = inputs
        fresh = self._check_logits(x, candidate, base, x_blurred, s, draw=1)[1:]
        return loss, verified & self._keeps_label(fresh, label)

    def _hard_objective(
        self,
        hard: torch.Tensor,
        x: torch.Tensor,
        label: torch.Tensor,
        ref_logits: torch.Tensor,
        ref_acts: list[torch.Tensor],
        base: torch.Tensor,
        x_blurred: torch.Tensor,
        s: MedCAMSettings,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective of binary masks ``hard`` ``(B, 1, *spatial)`` and whether they are verified, both ``(B,)``.

        The terms and weights of the optimisation (binarisation is 0 on a binary mask), with the
        robustness term averaged over the K verification backgrounds instead of one random draw
        (verified also counts the zeros check of :meth:`_outsides`; the objective does not).
        """
        checks = self._check_logits(x, hard, base, x_blurred, s)  # (1 + K [+ 1: zeros], B, classes)
        verified = self._keeps_label(checks, label)
        decision = DecisionLoss(reduction="none")
        loss = (
            s.kl_weight * OutputKLLoss(s.kl_temperature, reduction="none")(ref_logits, checks[0])
            + s.ce_weight * decision(checks[0], label)
            + s.rob_weight * torch.stack([decision(c, label) for c in checks[1 : 1 + s.verify_backgrounds]]).mean(0)
            + s.area_weight * AreaLoss(reduction="none")(hard)
            + s.tv_weight * TotalVariationLoss(reduction="none")(hard)
        )
        if self.classifier.layers:
            _, acts = self.classifier.logits_and_activations(hard * x + (1 - hard) * base)
            loss = loss + s.act_weight * ActivationMatchingLoss(self.classifier.layers, reduction="none")(ref_acts, acts)
        return loss, verified

    @staticmethod
    def _stable(hard_area: torch.Tensor, soft_area: torch.Tensor, before: tuple[torch.Tensor, torch.Tensor], tol: float) -> torch.Tensor:
        """``(B,)`` bool: the binary and the soft mask areas settled since the last check.

        Changes are measured against the mask's own area (at least 1% of the image), so a large
        mask that is still shrinking slowly does not count as settled; pixels flickering at the
        boundary (the straight-through estimator's way) do not count as unsettled.
        """
        hard_before, soft_before = before
        scale = hard_area.clamp_min(0.01)
        return ((hard_area - hard_before).abs() <= tol * scale) & ((soft_area - soft_before).abs() <= tol * scale)

    @staticmethod
    def _drop_finished(net: StackedMaskNet, optimizer: torch.optim.Adam, keep: torch.Tensor) -> None:
        """Remove finished explainers from the stacked networks and from Adam's state."""
        old_params = list(net.parameters())
        old_state = [optimizer.state.get(p, {}) for p in old_params]
        net.keep(keep)
        new_params = list(net.parameters())
        optimizer.param_groups[0]["params"] = new_params
        optimizer.state.clear()
        for p, state in zip(new_params, old_state):
            optimizer.state[p] = {k: (v[keep] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in state.items()}
