"""Each bad input gets a ValueError that names what was wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_medcam import MedCAM
from tests.toys import RegionClassifier, region_images


@pytest.fixture
def explainer():
    return MedCAM(RegionClassifier(), steps=2, max_retries=0)


def test_nan_in_image(explainer):
    x = region_images(3)
    x[2, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf.*images \[2\]"):
        explainer(x)


def test_inf_in_image(explainer):
    x = region_images(1)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        explainer(x)


@pytest.mark.parametrize("shape", [(32, 32), (1, 32, 32), (1, 1, 1, 32, 32, 32)])
def test_wrong_number_of_dimensions(explainer, shape):
    with pytest.raises(ValueError, match=rf"got {len(shape)} dims"):
        explainer(torch.rand(shape))


def test_channel_count_refused_by_classifier(explainer):
    with pytest.raises(ValueError, match=r"classifier refused an input of shape \(1, 3, 32, 32\)"):
        explainer(torch.rand(1, 3, 32, 32))


def test_empty_batch(explainer):
    with pytest.raises(ValueError, match="empty batch"):
        explainer(torch.rand(0, 1, 32, 32))


@pytest.mark.parametrize("class_idx", [2, -1, [0, 5]])
def test_class_index_out_of_range(explainer, class_idx):
    with pytest.raises(ValueError, match="out of range: the classifier has 2 classes"):
        explainer(region_images(2), class_idx=class_idx)


def test_class_index_that_is_not_whole_is_refused(explainer):
    with pytest.raises(ValueError, match=r"class_idx \[1.7.*\] must be whole class indices \(0..1\)"):
        explainer(region_images(2), class_idx=1.7)  # it used to explain class 1


@pytest.mark.parametrize("class_idx", ["1", True, object()])
def test_class_index_that_is_not_an_index_is_refused(explainer, class_idx):
    with pytest.raises(ValueError, match="class_idx must be"):
        explainer(region_images(1), class_idx=class_idx)


def test_class_index_count_mismatch(explainer):
    with pytest.raises(ValueError, match="3 labels for a batch of 2"):
        explainer(region_images(2), class_idx=[0, 1, 1])


def test_spatial_size_too_small(explainer):
    with pytest.raises(ValueError, match=r"spatial size \(4, 32\) is too small"):
        explainer(torch.rand(1, 1, 4, 32))
    with pytest.raises(ValueError, match=r"spatial size \(32, 32, 5\) is too small: .* >= 8 \(a volume: for a 2D classifier explain its slices"):
        explainer(torch.rand(1, 1, 32, 32, 5))  # a thin volume given to a 2D classifier: the slice hint, too


def test_inference_mode_is_refused(explainer):
    with torch.inference_mode():
        x = region_images(1)
        with pytest.raises(ValueError, match="inference_mode"):
            explainer(x)


def test_classifier_built_in_inference_mode_is_refused():
    with torch.inference_mode():
        model = RegionClassifier()
    with pytest.raises(ValueError, match="created under torch.inference_mode"):
        MedCAM(model, steps=1)(region_images(1))


def test_inference_tensor_input_outside_inference_mode_works(explainer):
    with torch.inference_mode():
        x = region_images(1)
    assert explainer(x).shape == (1, 1, 32, 32)


def test_no_grad_context_is_fine(explainer):
    with torch.no_grad():
        mask = explainer(region_images(1))
    assert mask.shape == (1, 1, 32, 32)


def test_not_a_tensor(explainer):
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        explainer([[1.0]])


def test_integer_images_are_accepted(explainer):
    x = (region_images(1) * 100).to(torch.uint8)
    assert explainer(x / 100.0).shape == (1, 1, 32, 32)
    assert explainer(x).shape == (1, 1, 32, 32)


def test_float64_and_float16_inputs_and_classifiers_are_taken():
    """numpy's float64 (and float16) images, and a classifier in float64: the mask network works in
    float32 and the classifier gets its own dtype. The same image gives the same mask in any input dtype."""
    x = region_images(2, seed=1)
    explainer = MedCAM(RegionClassifier(), steps=20, max_retries=0)
    plain = explainer.explain(x)
    assert torch.equal(explainer.explain(x.double()).mask, plain.mask)
    assert explainer.explain(x.half()).mask.shape == (2, 1, 32, 32)
    double = MedCAM(RegionClassifier().double(), steps=20, max_retries=0).explain(x.double())
    assert double.mask.dtype == plain.mask.dtype and double.label.tolist() == plain.label.tolist() == [1, 1]
    assert double.verified.all() and (double.mask != plain.mask).float().mean() < 0.05  # rounding apart, the same masks


def test_classifier_not_a_module():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        MedCAM(lambda x: x)


def test_classifier_with_wrong_output_shape():
    model = nn.Sequential(nn.Conv2d(1, 2, 3))  # returns a map, not logits
    with pytest.raises(ValueError, match=r"returned shape \(1, 2, 30, 30\).*expected \(B, K\)"):
        MedCAM(model, [], steps=1)(region_images(1))
