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
    hits = metrics.pointing_game(sal, truth)
    assert hits.dtype == torch.float32 and hits.tolist() == [1.0, 0.0]  # 1.0 / 0.0, NaN where undefined
    for scale in (1e-20, 1e37):  # any scale: neither underflows nor overflows
        assert metrics.energy_in_truth(sal * scale, truth).tolist() == [pytest.approx(0.75), pytest.approx(0.25)]
    assert metrics.energy_in_truth(torch.zeros(1, 1, 2, 2), truth[:1]).tolist() == [0.0]  # no energy anywhere


def test_an_empty_ground_truth_leaves_localisation_undefined():
    empty, mask = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    mask[0, 0, 1:3, 1:3] = 1
    truth = empty.clone()
    truth[1, 0, 0, 0] = 1  # the second image has a lesion, the first none
    for value in (metrics.iou(mask, truth), metrics.energy_in_truth(mask + 0.1, truth), metrics.pointing_game(mask, truth)):
        assert torch.isnan(value[0]) and not torch.isnan(value[1])  # undefined, not a miss that lowers a mean
    assert metrics.iou(mask, truth)[1] == 0.0
    assert torch.isnan(metrics.iou(empty, empty)).all()  # as MONAI's compute_iou(ignore_empty=True)


def test_pointing_game_ties_point_at_their_centre_and_tolerance_reaches_the_truth():
    truth = torch.zeros(1, 1, 5, 5)
    truth[..., 2, 2] = 1
    centred = torch.zeros(1, 1, 5, 5)
    centred[..., 1:4, 1:4] = 1  # nine tied maxima around the truth (argmax would take the corner (1, 1))
    assert metrics.pointing_game(centred, truth).tolist() == [1.0]
    assert metrics.pointing_game(centred.bool(), truth.bool()).tolist() == [1.0]  # bool maps as any mask
    corner = torch.zeros(1, 1, 5, 5)
    corner[..., 0, 0] = 1
    assert metrics.pointing_game(torch.zeros(1, 1, 5, 5), corner).tolist() == [0.0]  # a constant map points nowhere
    assert metrics.pointing_game(corner, truth).tolist() == [0.0]  # (0, 0) is 2.83 pixels from (2, 2)
    assert metrics.pointing_game(corner, truth, tolerance=2.8).tolist() == [0.0]
    assert metrics.pointing_game(corner, truth, tolerance=2.9).tolist() == [1.0]
    volume = torch.zeros(1, 1, 4, 4, 4)
    volume[..., 3, 3, 3] = 1
    assert metrics.pointing_game(volume, volume).tolist() == [1.0] and metrics.energy_in_truth(volume, volume).tolist() == [1.0]


def test_ties_in_a_saliency_map_are_not_broken_by_position():
    flat = torch.zeros(1, 1, 8, 8)
    by_position = metrics.binarize_top(flat, 0.5, seed=None)
    assert by_position[0, 0, :4].all() and not by_position[0, 0, 4:].any()  # the top rows: a side of the image
    top_half = metrics.binarize_top(flat, 0.5)
    assert top_half.sum() == 32 and 8 < top_half[0, 0, :4].sum() < 24  # spread over the image
    quarter = metrics.binarize_top(flat, 0.25)
    assert (quarter <= top_half).all()  # the same order at every area: insertion's sets are nested
    assert torch.equal(metrics.binarize_top(flat, 0.5), top_half)  # seeded: the same every call


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
    with pytest.raises(ValueError, match=r"mask \(1, 1, 4, 4\) does not match the images \(2, 1, 4, 4\)"):
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
    # insertion: 0, 1/4, 2/4, 2/4, 2/4 -> trapezoids (0 + 2/4) / 2 + 1/4 + 2/4 + 2/4 = 1.5, over 4 steps 0.375;
    # deletion: 2/4, 1/4, 0, 0, 0 -> (2/4 + 0) / 2 + 1/4 = 0.5, over 4 steps 0.125 (RISE's auc)
    assert ins.item() == pytest.approx(0.375, abs=1e-4)
    assert dele.item() == pytest.approx(0.125, abs=1e-4)
    ins_pair, dele_pair = metrics.insertion_deletion_auc(Share(), x, good, 1, steps=4, baseline=("zeros", "zeros"))
    assert (ins_pair.item(), dele_pair.item()) == (ins.item(), dele.item())
    x3 = torch.tensor([[[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])  # RISE: insert into blur, delete to zeros
    good3 = x3 + torch.linspace(0, 0.1, 9).view_as(x3)
    ins_b, _ = metrics.insertion_deletion_auc(Share(), x3, good3, 1, steps=3, baseline="blur")
    _, dele_z = metrics.insertion_deletion_auc(Share(), x3, good3, 1, steps=3, baseline="zeros")
    ins_rise, dele_rise = metrics.insertion_deletion_auc(Share(), x3, good3, 1, steps=3, baseline=("blur", "zeros"))
    assert (ins_rise.item(), dele_rise.item()) == (ins_b.item(), dele_z.item())
    ins_bad, dele_bad = metrics.insertion_deletion_auc(Share(), x, -good, label, steps=4, baseline="zeros")
    assert ins_bad < ins and dele_bad > dele


def test_bad_arguments_are_named_and_labels_the_classifier_lacks_refused():
    x, full = torch.full((2, 1, 4, 4), 0.8), torch.ones(2, 1, 4, 4)
    for call in (lambda: metrics.decision_kept(MeanLogit(), x, full, 5), lambda: metrics.label_probability(MeanLogit(), x, -1),
                 lambda: metrics.decision_kept_under_backgrounds(MeanLogit(), x, full, 2, k=2),
                 lambda: metrics.insertion_deletion_auc(MeanLogit(), x, full, 2, steps=2)):
        with pytest.raises(ValueError, match=r"label \[.*\] out of range: the classifier has 2 classes \(0..1\)"):
            call()  # a 1-based label used to read as "the evidence does not keep the decision"
    with pytest.raises(ValueError, match=r"truth must be \(B, 1, H, W\[, D\]\).*got \(2, 4, 4\)"):
        metrics.iou(full, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"shapes differ: mask \(2, 1, 4, 4\), truth \(2, 1, 4, 5\)"):
        metrics.iou(full, torch.ones(2, 1, 4, 5))
    with pytest.raises(ValueError, match="steps must be a whole number of at least 1, got 0"):
        metrics.insertion_deletion_auc(MeanLogit(), x, full, 1, steps=0)
    with pytest.raises(ValueError, match=r"area must be one fraction in \[0, 1\] or one per image \(2\), got \[1.5\]"):
        metrics.binarize_top(full, 1.5)
    with pytest.raises(ValueError, match="one per image"):
        metrics.binarize_top(full, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"tol must lie in \[0, 0.5\)"):
        metrics.non_binary_fraction(full, tol=-0.1)
    with pytest.raises(ValueError, match="k must be at least 1 background"):
        metrics.decision_kept_under_backgrounds(MeanLogit(), x, full, 1, k=2.0)
    with pytest.raises(ValueError, match="x must be images"):
        metrics.decision_kept(MeanLogit(), x[:0], full[:0], 1)
    with pytest.raises(TypeError, match="x must be a tensor of images .*, got ndarray"):
        metrics.decision_kept(MeanLogit(), x.numpy(), full, 1)
    nan = torch.zeros(1, 1, 2, 2)
    nan[..., 1, 1] = float("nan")
    with pytest.raises(ValueError, match="saliency holds NaN"):
        metrics.pointing_game(nan, torch.ones(1, 1, 2, 2))


def test_integer_images_and_metatensors_in_plain_tensors_out():
    from monai.data import MetaTensor

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.head(x).mean((2, 3))

    ct = torch.randint(0, 100, (2, 1, 4, 4), dtype=torch.int16)  # a CT's stored values
    net, full = Conv(), torch.ones(2, 1, 4, 4)
    label = net(ct.float()).argmax(1)
    assert metrics.decision_kept(net, ct, full, label).tolist() == [True, True]
    assert metrics.decision_kept(net, ct, full, label, baseline="mean").tolist() == [True, True]
    assert metrics.decision_kept_under_backgrounds(net, ct, full, label, k=2).tolist() == [1.0, 1.0]
    area = metrics.area_fraction(MetaTensor(full, meta={"filename_or_obj": "a.nii.gz"}))
    assert type(area) is torch.Tensor and area.tolist() == [1.0, 1.0]


def test_classifier_state_is_restored():
    model = RegionClassifier()
    model.train()
    metrics.label_probability(model, region_images(1), torch.tensor([1]))
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_backgrounds_count_must_be_positive():
    with pytest.raises(ValueError, match="k must be at least 1"):
        metrics.decision_kept_under_backgrounds(RegionClassifier(), region_images(1), torch.ones(1, 1, 32, 32), torch.tensor([1]), k=0)
