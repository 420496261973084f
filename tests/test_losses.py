"""Each loss term against values computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from monai_medcam.classifiers import TargetLayer
from monai_medcam.losses import (
    ActivationMatchingLoss,
    AreaLoss,
    BinarizationLoss,
    DecisionLoss,
    OutputKLLoss,
    TotalVariationLoss,
    straight_through_binary,
)

MASK = torch.tensor([[[[0.0, 1.0], [0.5, 1.0]]]])  # (1, 1, 2, 2)


def test_area_is_mean_mask_value():
    assert AreaLoss(reduction="none")(MASK).tolist() == [pytest.approx(2.5 / 4)]


def test_binarization_is_mean_of_m_times_one_minus_m():
    assert BinarizationLoss(reduction="none")(MASK).tolist() == [pytest.approx(0.25 / 4)]


def test_total_variation_sums_axes():
    # rows: |0.5 - 0| + |1 - 1| over 2 pairs -> 0.25; columns: |1 - 0| + |1 - 0.5| over 2 pairs -> 0.75
    assert TotalVariationLoss(reduction="none")(MASK).tolist() == [pytest.approx(1.0)]


def test_total_variation_3d_and_reduction():
    mask = torch.zeros(2, 1, 2, 2, 2)
    mask[0, 0, 0] = 1.0  # one face set: only the first axis changes, 4 of 4 pairs
    tv = TotalVariationLoss(reduction="none")(mask)
    assert tv.tolist() == [pytest.approx(1.0), pytest.approx(0.0)]
    assert TotalVariationLoss(reduction="sum")(mask).item() == pytest.approx(1.0)


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W"):
        AreaLoss()(torch.zeros(1, 2, 4, 4))


def test_kl_matches_hand_value_and_temperature():
    ref = torch.tensor([[2.0, 0.0]])
    evi = torch.tensor([[0.0, 0.0]])
    p = torch.tensor([math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)])  # softmax(ref / 2)
    expected = float((p * (p / 0.5).log()).sum())
    assert OutputKLLoss(temperature=2.0)(ref, evi).item() == pytest.approx(expected, rel=1e-5)
    assert OutputKLLoss(temperature=1.0)(ref, ref).item() == pytest.approx(0.0, abs=1e-7)


def test_decision_loss_is_cross_entropy_of_label():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p(label 1) = 3/4
    assert DecisionLoss(reduction="none")(logits, torch.tensor([1])).tolist() == [pytest.approx(-math.log(0.75))]


def test_activation_matching_mse_is_relative_to_reference_energy():
    ref = torch.tensor([[[[0.0, 2.0]], [[0.0, 20.0]]]])  # mean square (0 + 4 + 0 + 400) / 4 = 101
    evi = torch.tensor([[[[1.0, 2.0]], [[10.0, 20.0]]]])  # squared differences 1, 0, 100, 0: mean 25.25
    loss = ActivationMatchingLoss([TargetLayer("a", 1.0, "mse")], reduction="none")([ref], [evi])
    assert loss.tolist() == [pytest.approx(25.25 / 101)]
    zeros = ActivationMatchingLoss([TargetLayer("a", 1.0, "mse")])([ref], [torch.zeros_like(ref)])
    assert zeros.item() == pytest.approx(1.0)


def test_activation_matching_cosine_and_weights():
    ref = torch.tensor([[1.0, 0.0]])
    orth = torch.tensor([[0.0, 1.0]])
    layers = [TargetLayer("a", 1.0, "cosine"), TargetLayer("b", 3.0, "cosine")]
    loss = ActivationMatchingLoss(layers)([ref, ref], [ref, orth])
    assert loss.item() == pytest.approx((1 * 0.0 + 3 * 1.0) / 4)


def test_straight_through_is_binary_forward_identity_backward():
    soft = torch.tensor([0.2, 0.7], requires_grad=True)
    hard = straight_through_binary(soft)
    assert hard.tolist() == [0.0, 1.0]
    (hard * torch.tensor([2.0, 3.0])).sum().backward()
    assert soft.grad.tolist() == [2.0, 3.0]


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        AreaLoss(reduction="median")(MASK)
