"""Target-layer lookup for every supported family, activation capture, and leaving the classifier as found."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from monai.networks import nets as monai_nets

from monai_medcam import MedCAM
from monai_medcam.classifiers import FrozenClassifier, TargetLayer, tokens_to_grid
from tests.toys import RegionClassifier, region_images

tv = pytest.importorskip("torchvision")
from torchvision.models import ConvNeXt, GoogLeNet, MobileNetV2, VisionTransformer, resnet18  # noqa: E402
from torchvision.models.convnext import CNBlockConfig  # noqa: E402


def _convnext() -> nn.Module:
    blocks = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)]
    return ConvNeXt(blocks, num_classes=3)


FAMILIES = {
    "tv_resnet18": (lambda: resnet18(num_classes=3), (2, 3, 32, 32), ["relu", "layer1", "layer2", "layer3", "layer4"]),
    "tv_mobilenet_v2": (
        lambda: MobileNetV2(num_classes=3, width_mult=0.25),
        (2, 3, 32, 32),
        ["features.3", "features.6", "features.13", "features.18"],
    ),
    "tv_convnext": (_convnext, (2, 3, 32, 32), ["features.1", "features.3", "features.5", "features.7"]),
    "tv_vit": (
        lambda: VisionTransformer(32, 8, num_layers=4, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3),
        (2, 3, 32, 32),
        [f"encoder.layers.encoder_layer_{i}" for i in range(4)],
    ),
    "monai_densenet121_3d": (
        lambda: monai_nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2),
        (1, 1, 32, 32, 32),
        ["features.transition1", "features.transition2", "features.transition3", "features.norm5"],
    ),
    "monai_densenet121_2d": (
        lambda: monai_nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2),
        (2, 1, 32, 32),
        ["features.transition1", "features.transition2", "features.transition3", "features.norm5"],
    ),
    "monai_resnet_2d": (
        lambda: monai_nets.resnet10(spatial_dims=2, n_input_channels=1, num_classes=2),
        (2, 1, 32, 32),
        ["act", "layer1", "layer2", "layer3", "layer4"],
    ),
    "monai_resnet_3d": (
        lambda: monai_nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=2),
        (1, 1, 16, 16, 16),
        ["act", "layer1", "layer2", "layer3", "layer4"],
    ),
    "monai_vit_2d": (
        lambda: monai_nets.ViT(1, 32, 8, hidden_size=32, mlp_dim=64, num_layers=4, num_heads=2,
                               classification=True, num_classes=2, spatial_dims=2),
        (2, 1, 32, 32),
        ["blocks.0", "blocks.1", "blocks.2", "blocks.3"],
    ),
    "monai_vit_3d": (
        lambda: monai_nets.ViT(1, 16, 8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
                               classification=True, num_classes=2, spatial_dims=3),
        (1, 1, 16, 16, 16),
        ["blocks.0", "blocks.1"],
    ),
    "monai_efficientnet": (
        lambda: monai_nets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3, num_classes=2),
        (2, 3, 32, 32),
        ["_blocks.1", "_blocks.3", "_blocks.4", "_bn1"],
    ),
    "tv_googlenet_fallback": (  # not recognised: evenly spaced convolutions, never its auxiliary heads (idle in eval)
        lambda: GoogLeNet(num_classes=3, aux_logits=True, init_weights=False),
        (2, 3, 64, 64),
        ["inception3b.branch3.1.conv", "inception4c.branch1.conv", "inception4e.branch3.0.conv", "inception5b.branch4.1.conv"],
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_auto_layers_capture_activations(family):
    make, shape, expected = FAMILIES[family]
    model = make()
    clf = FrozenClassifier(model, "auto")
    assert [layer.name for layer in clf.layers] == expected
    assert all(layer.weight > 0 for layer in clf.layers)
    assert clf.is_transformer == ("vit" in family)  # the transformers' own defaults (BY_CLASSIFIER)
    x = torch.randn(shape)
    with clf.frozen(), torch.no_grad():
        logits, acts = clf.logits_and_activations(x)
    assert logits.shape == (shape[0], 3 if family.startswith(("tv_resnet", "tv_mob", "tv_conv", "tv_vit", "tv_goog")) else 2)
    assert len(acts) == len(expected)
    spatial_dims = len(shape) - 2
    for act in acts:
        assert act.shape[0] == shape[0]
        assert act.ndim == 2 + spatial_dims, f"{family}: activation {tuple(act.shape)} is not a (B, C, *grid) map"
    if "vit" in family:  # tokens -> grid of input // patch
        assert tuple(acts[-1].shape[2:]) == tuple(s // 8 for s in shape[2:])


def test_auto_layers_drive_a_real_explanation():
    model = monai_nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    result = MedCAM(model, steps=2, check_every=1, max_retries=0, verify_backgrounds=1).explain(torch.randn(1, 1, 32, 32, 32))
    assert result.mask.shape == (1, 1, 32, 32, 32)
    assert result.steps.tolist() == [2]


def test_tokens_to_grid_drops_prefix_tokens():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)  # 1 class token + 2x2 grid
    grid = tokens_to_grid(tokens, (16, 16), (8,))
    assert grid.shape == (2, 3, 2, 2)
    assert grid[0, :, 0, 0].tolist() == tokens[0, 1].tolist()


def test_unknown_layer_lists_nearest_names():
    with pytest.raises(ValueError, match=r"layer4x.*nearest valid names.*layer4"):
        FrozenClassifier(resnet18(), ["layer4x"])


def test_layers_by_module_callable_and_target_layer():
    model = resnet18()
    clf = FrozenClassifier(model, [model.layer2, lambda m: m.layer3, TargetLayer("layer4", 5.0, "mse")])
    assert [(l.name, l.weight, l.distance) for l in clf.layers] == [
        ("layer2", 1.0, "cosine"), ("layer3", 1.0, "cosine"), ("layer4", 5.0, "mse")
    ]
    clf = FrozenClassifier(model, ["layer3", "layer4"], layer_weights=[2, 3], layer_distances=["mse", "cosine"])
    assert [(l.weight, l.distance) for l in clf.layers] == [(2.0, "mse"), (3.0, "cosine")]
    with pytest.raises(ValueError, match="layer_weights has 1 entries"):
        FrozenClassifier(model, ["layer2", "layer3"], layer_weights=[1.0])


def test_single_logit_classifier_becomes_two_class():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    clf = FrozenClassifier(model, [])
    with clf.frozen(), torch.no_grad():
        logits = clf.logits(torch.randn(3, 1, 4, 4))
    assert logits.shape == (3, 2)
    assert torch.equal(logits[:, 0], torch.zeros(3))
    assert torch.allclose(torch.softmax(logits, 1)[:, 1], torch.sigmoid(logits[:, 1]))


def test_squeezed_logits_are_read_whatever_the_batch():
    """A classifier that squeezes its output returns () or (K,) for a batch of one (the engine's
    sub-batches: shrinking, pruning, retries): read as (1, 1) and (1, K), as its larger batches."""
    class Squeezed(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.fc = nn.Linear(16, classes)

        def forward(self, x):
            return self.fc(x.flatten(1)).squeeze()

    x = torch.randn(3, 1, 4, 4)
    for classes in (1, 2):
        model = Squeezed(classes)
        clf = FrozenClassifier(model, [])
        with clf.frozen(), torch.no_grad():
            batch = clf.logits(x)
            ones = torch.cat([clf.logits(x[i : i + 1]) for i in range(3)])
        assert batch.shape == (3, 2) and torch.allclose(ones, batch, atol=1e-6)

    class Pair(nn.Module):  # (features, logits): the first item is taken, and the error says so
        def forward(self, x):
            return x.mean((1, 2, 3)).sum(), x
    with pytest.raises(ValueError, match=r"returned shape \(\) \(the first item of the tuple it returned\) for input \(3, 1, 4, 4\)"):
        with FrozenClassifier(Pair(), []).frozen() as clf:
            clf.logits(x)


def test_target_layers_given_twice_are_refused():
    with pytest.raises(ValueError, match=r"target layers \['layer2'\] are given more than once"):
        FrozenClassifier(resnet18(), ["layer2", "layer3", "layer2"])
    clf = FrozenClassifier(resnet18(), [TargetLayer("layer2"), TargetLayer("layer2", distance="mse")])  # two distances: two terms
    assert [layer.distance for layer in clf.layers] == ["cosine", "mse"]
    clf = FrozenClassifier(resnet18(), ["layer2", "layer2"], layer_distances=["cosine", "mse"])  # as given by layer_distances
    assert [layer.distance for layer in clf.layers] == ["cosine", "mse"]
    with pytest.raises(ValueError, match="given more than once with one distance"):
        FrozenClassifier(resnet18(), [TargetLayer("layer2"), TargetLayer("layer2", distance="mse")], layer_distances=["mse", "mse"])


def test_auto_layers_on_a_known_name_laid_out_otherwise_fall_back_to_spread_layers(caplog):
    """A network named as a recognised one but laid out otherwise (timm's ResNet has ``act1``, its
    ConvNeXt ``stages`` and no ``features``) gets evenly spaced layers, not a wrong name."""
    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.act1 = nn.Conv2d(3, 4, 3), nn.ReLU()
            for i in range(1, 5):
                setattr(self, f"layer{i}", nn.Conv2d(4, 4, 3, padding=1))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.act1(self.conv1(x))
            for i in range(1, 5):
                x = getattr(self, f"layer{i}")(x)
            return self.fc(x.mean((2, 3)))

    class ConvNeXt(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.stages, self.head = nn.Conv2d(3, 4, 2, 2), nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.stages(self.stem(x)).mean((2, 3)))

    for model in (ResNet(), ConvNeXt()):
        with caplog.at_level("INFO", logger="monai_medcam.classifiers"):
            layers = [layer.name for layer in FrozenClassifier(model).layers]
        assert layers and all(name in dict(model.named_modules()) for name in layers)
        assert f"target_layers='auto' does not know {type(model).__name__}" in caplog.text
        result = MedCAM(model, steps=3, max_retries=0, restarts=0).explain(torch.rand(1, 3, 16, 16))
        assert result.mask.shape == (1, 1, 16, 16)


def _state(model: nn.Module) -> tuple:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return (model.training, [p.requires_grad for p in model.parameters()], hooks)


def test_state_restored_and_hooks_removed_after_success():
    model = RegionClassifier()
    model.train()
    model.conv2.weight.requires_grad_(False)
    before = _state(model)
    weights = [p.detach().clone() for p in model.parameters()]
    MedCAM(model, steps=3, check_every=1, max_retries=0).explain(region_images(1))
    assert _state(model) == before
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_state_restored_and_hooks_removed_after_error():
    class Failing(RegionClassifier):
        calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("boom in forward")
            return super().forward(x)

    model = Failing()
    model.train()
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        MedCAM(model, steps=3, check_every=1).explain(region_images(1))
    assert _state(model) == before


def test_one_layer_given_alone_is_one_layer():
    model = resnet18()
    for spec in ("layer4", model.layer4, lambda m: m.layer4, TargetLayer("layer4")):
        assert [l.name for l in FrozenClassifier(model, spec).layers] == ["layer4"]  # a Sequential is not iterated
    with pytest.raises(TypeError, match="target_layers must be 'auto', a layer"):
        FrozenClassifier(model, None)
    blocks = nn.ModuleList([model.layer3, model.layer4])  # never runs itself: its members are the layers
    assert [l.name for l in FrozenClassifier(model, blocks).layers] == ["layer3", "layer4"]
    assert [l.name for l in FrozenClassifier(model, (n for n in ("layer2", "layer4"))).layers] == ["layer2", "layer4"]


def test_wrapped_classifier_gets_the_wrapped_networks_layers():
    model = resnet18(num_classes=3)
    plain = FrozenClassifier(model).layers
    wrapped = FrozenClassifier(nn.DataParallel(model)).layers
    assert [(l.name, l.weight) for l in wrapped] == [(f"module.{l.name}", l.weight) for l in plain]
    vit = FAMILIES["tv_vit"][0]()
    clf = FrozenClassifier(nn.DataParallel(vit))
    assert clf.is_transformer and clf.layers[-1].name == "module.encoder.layers.encoder_layer_3"
    x = torch.rand(2, 3, 32, 32)
    with clf.frozen(), torch.no_grad():
        _, acts = clf.logits_and_activations(x)
    assert acts[-1].shape == (2, 16, 4, 4)  # tokens laid back on the 4 x 4 patch grid


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_classifier_matches_no_activations():
    scripted = torch.jit.script(RegionClassifier())
    assert FrozenClassifier(scripted).layers == []  # 'auto': hooks do not run in TorchScript
    with pytest.raises(ValueError, match=r"TorchScript.*target_layers=\[\]"):
        FrozenClassifier(scripted, ["conv1"])
    result = MedCAM(scripted, steps=3, check_every=1, max_retries=0, restarts=0).explain(region_images(1))
    assert result.mask.shape == (1, 1, 32, 32)


def test_classifier_assertion_is_a_clear_error():
    vit = FAMILIES["tv_vit"][0]()  # torchvision's ViT asserts its image size
    with pytest.raises(ValueError, match=r"classifier refused an input of shape \(1, 3, 48, 48\).*Wrong image height"):
        MedCAM(vit, steps=2).explain(torch.rand(1, 3, 48, 48))

    class Bare(RegionClassifier):
        def forward(self, x):
            if x.shape[-1] != 32:
                raise AssertionError  # a bare assert (pytest would add a message to one written in a test)
            return super().forward(x)

    with pytest.raises(ValueError, match=r"refused an input of shape \(1, 1, 40, 40\): AssertionError$"):
        MedCAM(Bare(), steps=2).explain(torch.rand(1, 1, 40, 40))
