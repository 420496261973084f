"""Metrics against hand-computed cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_medcam import metrics
from tests.toys import RegionClassifier, region_images


class MeanLogit(nn.Module):
    """Class 1 when the image mean exceeds 0.5 (a single logit)."""

    def forward(self, x):
        return (x.flatten(1).mean(1) - 0.5) * 100


def test_area_and_non_binary():
    mask = torch.tensor([[[[0.0, 0.3], [1.0, 0.995]]]])
    assert metrics.area_fraction(mask).tolist() == [pytest.approx(0.5)]
    assert metrics.non_binary_fraction(mask).tolist() == [pytest.approx(0.25)]  # only 0.3 (0.995 is within 0.01 of 1)


def test_binarize_top_per_image_area():
    sal = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]], [[[1.0, 2.0], [3.0, 4.0]]]])
    top = metrics.binarize_top(sal, torch.tensor([0.25, 0.5]))
    assert top[0].flatten().tolist() == [1, 0, 0, 0]
    assert top[1].flatten().tolist() == [0, 0, 1, 1]
    assert metrics.binarize_top(sal, 0.0).sum() == 0 and metrics.binarize_top(sal, 1.0).sum() == 8


def test_iou_energy_pointing():
    truth = torch.zeros(2, 1, 2, 2)
    truth[:, 0, 0, 0] = 1
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    assert metrics.iou(mask, truth).tolist() == [pytest.approx(0.5), 0.0]
    sal = torch.tensor([[[[3.0, 1.0], [0.0, 0.0]]], [[[1.0, 3.0], [0.0, 0.0]]]])
    assert metrics.energy_in_truth(sal, truth).tolist() == [pytest.approx(0.75), pytest.approx(0.25)]
    assert metrics.pointing_game(sal, truth).tolist() == [True, False]
    assert metrics.iou(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).tolist() == [0.0]


def test_three_dimensional_maps():
    truth = torch.zeros(1, 1, 2, 2, 2)
    truth[0, 0, 1] = 1
    assert metrics.iou(truth, truth).tolist() == [1.0]
    assert metrics.area_fraction(truth).tolist() == [0.5]


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W"):
        metrics.area_fraction(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.iou(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_labels_as_ints_or_lists_and_masks_that_do_not_fit():
    x = torch.full((2, 1, 4, 4), 0.8)
    full = torch.ones(2, 1, 4, 4)
    p = metrics.label_probability(MeanLogit(), x, 1)  # one class for every image
    assert torch.allclose(p, torch.sigmoid(torch.tensor(30.0)).expand(2))
    assert torch.allclose(metrics.label_probability(MeanLogit(), x, [0, 1]), torch.stack([1 - p[0], p[1]]))
    assert metrics.decision_kept(MeanLogit(), x, full, [0, 1]).tolist() == [False, True]  # a (B,) tensor, not one bool
    assert metrics.decision_kept_under_backgrounds(MeanLogit(), x, full, 1, k=2).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"the masks \(1, 1, 4, 4\) do not match the images \(2, 1, 4, 4\)"):
        metrics.decision_kept(MeanLogit(), x, full[:1], 1)  # it used to broadcast
    with pytest.raises(ValueError, match="3 labels for a batch of 2 images"):
        metrics.label_probability(MeanLogit(), x, [0, 1, 1])


def test_decision_kept_and_probability_single_logit():
    x = torch.full((2, 1, 4, 4), 0.8)  # mean 0.8 -> class 1
    full, half = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    half[:, :, :2] = 1  # evidence mean 0.4 -> class 0 with zeros outside
    label = torch.ones(2, dtype=torch.long)
    assert metrics.decision_kept(MeanLogit(), x, full, label).tolist() == [True, True]
    assert metrics.decision_kept(MeanLogit(), x, half, label).tolist() == [False, False]
    assert metrics.decision_kept(MeanLogit(), x, half, label, baseline="mean").tolist() == [True, True]
    p = metrics.label_probability(MeanLogit(), x, label)
    assert torch.allclose(p, torch.sigmoid(torch.tensor(30.0)).expand(2))


def test_decision_kept_under_backgrounds_on_known_region():
    model = RegionClassifier()
    x = region_images(2)
    label = torch.ones(2, dtype=torch.long)
    region = torch.zeros(2, 1, 32, 32)
    region[:, :, 7:17, 7:17] = 1
    assert metrics.decision_kept_under_backgrounds(model, x, region, label, k=6).tolist() == [1.0, 1.0]
    corner = torch.zeros(2, 1, 32, 32)
    corner[:, :, 24:, 24:] = 1
    # the region then holds background only. The 6 backgrounds are blur, then Gaussian and uniform
    # in turn (blur, g, u, g, u, g): Gaussian noise with the image's statistics (mean 0.3) falls
    # below the threshold (0.4); uniform noise over the image's range (mean about 0.55) and the
    # blurred bright square stay above it: 3 of 6 keep the label
    kept = metrics.decision_kept_under_backgrounds(model, x, corner, label, k=6)
    assert kept.tolist() == [pytest.approx(3 / 6), pytest.approx(3 / 6)]


def test_insertion_deletion_auc_hand_case():
    # a classifier that counts bright pixels: p(class 1) = share of pixels equal to 1
    class Share(nn.Module):
        def forward(self, x):
            share = (x > 0.5).float().flatten(1).mean(1).clamp(1e-6, 1 - 1e-6)
            return torch.stack([torch.log(1 - share), torch.log(share)], 1)

    x = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    good = torch.tensor([[[[2.0, 1.0], [0.0, -1.0]]]])  # the bright pixels first
    label = torch.tensor([1])
    ins, dele = metrics.insertion_deletion_auc(Share(), x, good, label, steps=4, baseline="zeros")
    # insertion: 0, 1/4, 2/4, 2/4, 2/4 -> mean 0.35; deletion: 2/4, 1/4, 0, 0, 0 -> mean 0.15
    assert ins.item() == pytest.approx(0.35, abs=1e-4)
    assert dele.item() == pytest.approx(0.15, abs=1e-4)
    ins_bad, dele_bad = metrics.insertion_deletion_auc(Share(), x, -good, label, steps=4, baseline="zeros")
    assert ins_bad < ins and dele_bad > dele


def test_classifier_state_is_restored():
    model = RegionClassifier()
    model.train()
    metrics.label_probability(model, region_images(1), torch.tensor([1]))
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_backgrounds_count_must_be_positive():
    with pytest.raises(ValueError, match="k must be at least 1"):
        metrics.decision_kept_under_backgrounds(RegionClassifier(), region_images(1), torch.ones(1, 1, 32, 32), torch.tensor([1]), k=0)
