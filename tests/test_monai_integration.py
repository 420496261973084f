"""The transform pair and the inferer inside MONAI's Compose, DataLoader and SupervisedEvaluator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose, EnsureTyped

from monai_medcam import MedCAMExplain, MedCAMExplaind, MedCAMInferer
from tests.toys import RegionClassifier, region_images

REGION = (slice(8, 16), slice(8, 16))
FAST = dict(max_retries=0)
MIN_IOU = 0.2
AFFINE = torch.tensor([[0.5, 0, 0, 10.0], [0, 0.5, 0, -4.0], [0, 0, 1, 2.0], [0, 0, 0, 1]], dtype=torch.float64)


def _iou(mask: torch.Tensor) -> float:
    """IoU with the region the toy classifier looks at. A single optimisation is chaotic and the early stop
    (``patience=1``) takes the first verified, settled mask: on this toy IoU runs 0.29-0.83 over 8 images
    (docs/settings.md), so these integration tests ask for ``MIN_IOU``, well above a misplaced mask's ~0."""
    truth = torch.zeros(32, 32)
    truth[REGION] = 1
    mask = mask.reshape(32, 32).float()
    return float((mask * truth).sum() / ((mask + truth) > 0).sum())


def _image(seed: int = 0) -> MetaTensor:
    return MetaTensor(region_images(1, seed=seed)[0], affine=AFFINE, meta={"filename_or_obj": f"img{seed}.nii"})


def test_array_transform_keeps_metadata_and_finds_region():
    evidence = MedCAMExplain(RegionClassifier(), **FAST)(_image())
    assert evidence.shape == (1, 32, 32)
    assert torch.equal(evidence.affine, AFFINE)
    assert evidence.meta["filename_or_obj"] == "img0.nii"
    diagnostics = evidence.meta["medcam"]
    assert diagnostics["verified"] is True and diagnostics["label"] == 1
    assert 0 < diagnostics["area"] < 0.25
    assert _iou(evidence) > MIN_IOU


def test_array_transform_refuses_image_without_channel():
    with pytest.raises(ValueError, match="channel-first image"):
        MedCAMExplain(RegionClassifier(), **FAST)(torch.rand(32, 32))  # no channel axis
    with pytest.raises(ValueError, match=r"one channel-first image .*\(4, 1, 32, 32\).* a batch of 2D images"):
        MedCAMExplain(RegionClassifier(), **FAST)(torch.rand(4, 1, 32, 32))  # a batch, not a volume


def test_transforms_take_numpy_arrays_as_monais_do():
    """A numpy image (a Dataset without EnsureType) gets the mask its tensor gets, as a MetaTensor."""
    from monai_medcam.transforms import ToClassifierSpace

    image = region_images(1, seed=0)[0]
    array = image.numpy().astype(">f8")[:, ::-1].copy()[:, ::-1]  # float64, big-endian, negative strides
    explain = MedCAMExplaind(keys="image", nn_module=RegionClassifier(), steps=20, restarts=0, **FAST)
    from_tensor, from_array = (explain({"image": x})["image_evidence"] for x in (image, array))
    assert isinstance(from_array, MetaTensor) and from_array.shape == (1, 32, 32)
    assert from_array.meta["medcam"]["label"] == 1 and torch.equal(from_array.as_tensor(), from_tensor.as_tensor())
    resized = ToClassifierSpace(2, 3, size=16)(array)
    assert isinstance(resized, MetaTensor) and resized.shape == (3, 16, 16)
    assert torch.allclose(resized.as_tensor(), ToClassifierSpace(2, 3, size=16)(image).as_tensor())
    for bad, got in ((np.zeros((1, 32, 32), dtype=object), "an array of object"), (np.array(1.0), r"\(\)")):
        for transform in (ToClassifierSpace(2, 3, size=16), MedCAMExplain(RegionClassifier(), **FAST)):
            with pytest.raises(ValueError, match=f"{type(transform).__name__} takes a channel-first image .*; got {got}"):
                transform(bad)


def test_dictionary_transform_in_compose():
    pipeline = Compose([EnsureTyped(keys="image"), MedCAMExplaind(keys="image", nn_module=RegionClassifier(), **FAST)])
    out = pipeline({"image": _image(), "label": 1})
    assert set(out) == {"image", "label", "image_evidence"}
    assert torch.equal(out["image_evidence"].affine, AFFINE)
    assert out["image_evidence"].meta["medcam"]["verified"] is True
    assert _iou(out["image_evidence"]) > MIN_IOU


def test_dictionary_transform_options():
    explain = MedCAMExplaind(
        keys=["image", "other"], nn_module=RegionClassifier(), output_keys=["ev", "ev_other"], class_idx_key="label",
        output="soft_mask", allow_missing_keys=True, **FAST,
    )
    out = explain({"image": _image(), "label": torch.tensor([0])})
    assert "ev" in out and "ev_other" not in out
    assert out["ev"].meta["medcam"]["label"] == 0  # explained the class asked for, not the prediction
    soft = out["ev"]
    assert soft.dtype.is_floating_point and 0 <= float(soft.min()) and float(soft.max()) <= 1
    with pytest.raises(ValueError, match=r"'label' holds 2 values \[0.0, 1.0\]; give the class index"):
        explain({"image": _image(), "label": torch.tensor([0.0, 1.0])})  # one-hot: it used to explain class 0
    with pytest.raises(KeyError, match="image"):
        MedCAMExplaind(keys="image", nn_module=RegionClassifier())({"label": 1})
    with pytest.raises(ValueError, match="output_keys"):
        MedCAMExplaind(keys="image", nn_module=RegionClassifier(), output_keys=["a", "b"])


def test_inferer_in_supervised_evaluator():
    data = [{"image": _image(seed), "label": torch.tensor(1)} for seed in range(3)]
    loader = DataLoader(Dataset(data), batch_size=2)
    inferer = MedCAMInferer(**FAST)
    evaluator = SupervisedEvaluator(torch.device("cpu"), loader, network=RegionClassifier(), inferer=inferer, decollate=True)
    outputs = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.extend(engine.state.output))
    evaluator.run()
    assert len(outputs) == 3
    for item in outputs:
        pred = item["pred"]
        assert pred.shape == (1, 32, 32)
        assert torch.allclose(pred.affine, AFFINE)
        assert pred.meta["medcam"]["verified"] is True
        assert _iou(pred) > MIN_IOU


def test_inferer_under_no_grad_and_inference_mode():
    network = RegionClassifier()
    inferer = MedCAMInferer(**FAST)
    with torch.no_grad():
        out = inferer(region_images(2), network)
    assert out.shape == (2, 1, 32, 32)
    assert out.meta["medcam"]["verified"] == [True, True]
    assert inferer.last_result is not None and len(inferer.last_result) == 2
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        inferer(region_images(1), network)
    with pytest.raises(TypeError, match="unknown MedCAM setting"):
        MedCAMInferer(stepz=3)
    with pytest.raises(ValueError, match="extra arguments"):
        inferer(region_images(1), network, "x")


def test_the_inferers_evidence_has_its_own_meta_one_affine_per_image_and_checked_labels():
    from monai.data import decollate_batch

    quick = dict(steps=20, restarts=0, target_layers=[], **FAST)
    network = RegionClassifier()
    batch = MetaTensor(region_images(2), affine=AFFINE[None].repeat(2, 1, 1), meta={"filename_or_obj": ["a.nii", "b.nii"]})
    batch.is_batch = True
    with torch.no_grad():
        predicted = MedCAMInferer(**quick)(batch, network)
        asked = MedCAMInferer(class_idx=0, **quick)(batch, network)
    asked.meta["filename_or_obj"][0] = "evidence.nii.gz"
    asked.affine[0, 0, 3] = 99.0
    assert predicted.meta["medcam"]["label"] == [1, 1] and asked.meta["medcam"]["label"] == [0, 0]
    assert "medcam" not in batch.meta and batch.meta["filename_or_obj"] == ["a.nii", "b.nii"]  # the inputs untouched
    assert torch.equal(batch.affine, AFFINE[None].repeat(2, 1, 1)) and torch.equal(predicted.affine, batch.affine)
    with torch.no_grad():
        plain = MedCAMInferer(**quick)(region_images(2).numpy(), network)  # a plain array: identity affines
    assert [item.affine.tolist() for item in decollate_batch(plain)] == [torch.eye(4).tolist()] * 2
    with pytest.raises(ValueError, match="class_idx gives 2 labels for a batch of 4 images"):
        MedCAMInferer(class_idx=[0, 1], batch_size=2, **quick)(region_images(4), network)  # not repeated per part
    with pytest.raises(ValueError, match=r"a 3D classifier cannot explain .* \(expected \(B, C, H, W, D\)\)"):
        MedCAMInferer(spatial_dims=3, **quick)(region_images(1), network)
    volumes = region_images(4).permute(1, 2, 3, 0).reshape(1, 1, 32, 32, 4).repeat(2, 1, 1, 1, 1)  # (2, 1, 32, 32, 4)
    with torch.no_grad():
        per_volume = MedCAMInferer(spatial_dims=2, class_idx=[0, 1], batch_size=3, **quick)(volumes, network)
    assert per_volume.meta["medcam"]["label"].tolist() == [[0] * 4, [1] * 4]  # each volume's class on all its slices
    with pytest.raises(ValueError, match=r"3 labels for 2 volume\(s\) of 4 slices: give one, one per volume \(2\) or one per slice \(8\)"):
        MedCAMInferer(spatial_dims=2, class_idx=[0, 1, 1], **quick)(volumes, network)


def test_the_dictionary_transform_names_the_key_at_fault_and_allows_a_missing_label():
    quick = dict(steps=20, restarts=0, target_layers=[], **FAST)
    explain = MedCAMExplaind("image", RegionClassifier(), class_idx_key="label", allow_missing_keys=True, **quick)
    assert explain({"other": 1}) == {"other": 1}  # nothing to explain: no label needed
    assert explain({"image": _image()})["image_evidence"].meta["medcam"]["label"] == 1  # no label: the prediction
    with pytest.raises(ValueError, match=r"data\['image'\]: .*channel-first image") as caught:
        explain({"image": torch.rand(32, 32), "label": 1})
    assert "label" not in str(caught.value)  # an image at fault, not the class
    with pytest.raises(ValueError, match=r"data\['image'\]: class_idx \[7\] out of range.* \(the class from data\['label'\]\)"):
        explain({"image": _image(), "label": 7})
    with pytest.raises(ValueError, match=r"data\['label'\] must be a class index"):
        explain({"image": _image(), "label": "pneumonia"})


def test_inferer_explains_volumes_slice_by_slice_in_chunks(caplog):
    from monai.data import decollate_batch

    slices = region_images(4, seed=3)  # (4, 1, 32, 32), each with the region
    slices[[0, 2]] = 0.3 * torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))  # no region: class 0
    volume = slices.permute(1, 2, 3, 0)[None]  # (1, 1, 32, 32, 4): slices on the last axis
    inferer = MedCAMInferer(spatial_dims=2, batch_size=2, **FAST)  # 4 slices in chunks of 2
    batch = MetaTensor(volume, affine=AFFINE[None])
    batch.is_batch = True  # as a DataLoader collates it
    with torch.no_grad(), caplog.at_level("WARNING", logger="monai_medcam.engine"):
        out = inferer(batch, RegionClassifier())
    # the region-free slices 0 and 2 are vacuous: named by their index in the volume, not in their chunk
    vacuous = [r.getMessage().split(":")[0] for r in caplog.records if "vacuous" in r.getMessage()]
    assert vacuous == ["images [0/slice 0]", "images [0/slice 2]"]  # volume 0 of the batch
    assert out.shape == (1, 1, 32, 32, 4)
    assert len(inferer.last_result) == 4
    (item,) = decollate_batch(out)
    assert item.meta["medcam"]["label"].tolist() == [0, 1, 0, 1]
    assert item.meta["medcam"]["verified"].tolist() == [True] * 4
    for k in (1, 3):
        assert _iou(item[0, :, :, k]) > MIN_IOU
    assert torch.allclose(item.affine, AFFINE)
    with pytest.raises(ValueError, match="2D classifier cannot explain"):
        MedCAMInferer(spatial_dims=2)(torch.rand(1, 1, 8, 8, 8, 8), RegionClassifier())


def test_inferer_remembers_how_many_images_fit_in_gpu_memory(monkeypatch):
    """An evaluator calls the inferer once per batch: after one batch ran out of GPU memory, the next
    starts from the size that fit, not from the full batch again (and a new network from scratch)."""
    from monai_medcam import MedCAM
    from tests.toys import small_gpu_optimise

    sizes = []
    monkeypatch.setattr(MedCAM, "_optimise", small_gpu_optimise(2, sizes))
    inferer, net = MedCAMInferer(**{**FAST, "steps": 3}), RegionClassifier()
    with torch.no_grad():
        inferer(region_images(4, seed=3), net)
        assert sizes == [4, 2, 2]
        sizes.clear()
        inferer(region_images(4, seed=4), net)
        assert sizes == [2, 2]  # no failed attempt the second time
        sizes.clear()
        inferer(region_images(4, seed=4), RegionClassifier())  # another network: its own explainer
        assert sizes == [4, 2, 2]
        sizes.clear()
        inferer.settings["steps"] = 4  # changed settings: a new explainer, which takes them
        inferer(region_images(4, seed=4), net)
        assert sizes == [4, 2, 2] and int(inferer.last_result.steps.max()) <= 4 * 2 ** 2


def test_load_convert_save_transforms_restore_source_geometry(tmp_path):
    import nibabel as nib
    import numpy as np

    from monai_medcam.transforms import LoadInputd, SaveEvidenced, ToClassifierSpace, ToClassifierSpaced

    affine = np.diag([0.8, 1.2, 3.0, 1.0])
    affine[:3, 3] = [-20, 5, 7]
    volume = np.random.default_rng(0).random((40, 48, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "vol.nii.gz")
    data = Compose([LoadInputd("image"), ToClassifierSpaced("image", spatial_dims=2, channels=1, size=32)])(
        {"image": str(tmp_path / "vol.nii.gz")}
    )
    assert data["image"].shape == (1, 32, 32, 3) and data["image_source"].shape == (1, 40, 48, 3)
    # the resized image's affine puts its voxel centres where they lie in the source: voxel (0, 0, k)
    # covers source voxels 0..1.25 (40/32) along x, centred at 0.125
    centre = data["image"].affine.numpy() @ np.array([0, 0, 1, 1.0])
    np.testing.assert_allclose(centre, affine @ np.array([(40 / 32 - 1) / 2, (48 / 32 - 1) / 2, 1, 1.0]), atol=1e-9)
    assert 0.0 <= float(data["image"].min()) and float(data["image"].max()) <= 1.0
    # a box in classifier space, with the per-slice diagnostics an inferer gives
    evidence = torch.zeros(1, 32, 32, 3)
    evidence[0, 8:16, 16:24, 1] = 1
    diagnostics = {"label": torch.tensor([0, 1, 0]), "area": torch.tensor([0.0, 0.0625, 0.0]), "vacuous": torch.tensor([True, False, True])}
    data["pred"] = MetaTensor(evidence, meta={"medcam": diagnostics})
    saver = SaveEvidenced(output_dir=tmp_path / "out", formats=["nifti"])
    out = saver(data)
    written = nib.load(tmp_path / "out" / "vol_evidence.nii.gz")
    assert out["pred_files"] == [str(tmp_path / "out" / "vol_evidence.nii.gz")]
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    mask = np.asarray(written.dataobj)
    assert mask.shape == (40, 48, 3)
    expected = np.zeros((40, 48, 3), np.uint8)
    expected[10:20, 24:36, 1] = 1  # the box scaled by 40/32 and 48/32
    np.testing.assert_array_equal(mask, expected)
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[2].split(",")[1:4] == ["1", "vol", "1"]  # slice 1, its output name, label 1
    with pytest.raises(ValueError, match="unknown output format"):
        SaveEvidenced(formats=["jpeg"])
    for bad in (0, (32, -1), (32, 32, 32)):
        with pytest.raises(ValueError, match="must be 2 positive side length"):
            ToClassifierSpace(2, 1, size=bad)
    assert SaveEvidenced(formats="png").formats == ["png"] and SaveEvidenced(formats="seg, nifti").formats == ["seg", "nifti"]


def test_grad_cam_is_upright_and_leaves_the_classifier_as_found():
    """MONAI's Grad-CAM, as the comparison panels use it: high on the evidence (MONAI's default
    normaliser would invert it), and the classifier as it was, also after an error. MONAI registers
    two hooks per call and never removes them (Med-CAM's later passes would run them all), turns
    the layer's ``inplace`` off and refills every parameter's gradient."""
    from monai_medcam.visualize import grad_cam

    net = RegionClassifier()
    x = torch.zeros(2, 1, 32, 32)
    x[:, :, 8:16, 8:16] = 1.0  # bright only where the classifier looks
    x[1, :, 8:12, 8:16] = 0.5
    seen = []
    own = [net.conv.register_forward_hook(lambda *_: None),  # the user's own hooks stay, one on the target layer
           net.relu2.register_full_backward_hook(lambda *_: seen.append(1))]
    net(x).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]

    def hooks() -> list[tuple[str, int, int]]:
        return [(name, len(m._forward_hooks), len(m._backward_hooks)) for name, m in net.named_modules() if m._forward_hooks or m._backward_hooks]

    first = grad_cam(net, x, "relu2", torch.tensor([1, 1]))
    second = grad_cam(net, x, "relu2", torch.tensor([1, 1]))
    with pytest.raises(IndexError):
        grad_cam(net, x, "relu2", torch.tensor([5, 5]))  # no class 5: fails inside MONAI's pass
    assert hooks() == [("conv", 1, 0), ("relu2", 0, 1)] and net.relu2._is_full_backward_hook is True
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    count = len(seen)
    net.zero_grad()
    net(x).sum().backward()
    assert len(seen) == count + 1  # the user's backward hook still runs, once per pass
    assert torch.equal(first, second) and first.shape == (2, 1, 32, 32)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:16, 8:16] = True
    for m in first[:, 0]:
        assert float(m.amax()) == pytest.approx(1.0) and float(m.amin()) == pytest.approx(0.0)
        assert float(m[inside].mean()) > 0.5 > float(m[~inside].mean()), "Grad-CAM inverted"
    for handle in own:
        handle.remove()
    plain = RegionClassifier()  # a user's in-place ReLU (it cannot carry a full backward hook) stays in place
    plain.relu2.inplace = True
    grad_cam(plain, x, "relu2")
    assert plain.relu2.inplace is True and all(p.grad is None for p in plain.parameters())


class _TokensOnGrid(torch.nn.Module):
    """A vision transformer whose ``layer`` output passes, laid on the patch grid ``(B, D, h, w)``,
    through an identity module ``grid``: MONAI's own Grad-CAM on ``grid`` is the reference for Grad-CAM on
    the transformer's tokens (which MONAI's CAMs cannot take)."""

    def __init__(self, vit: torch.nn.Module, layer: str, side: int):
        super().__init__()
        self.vit, self.grid, self.side = vit, torch.nn.Identity(), side
        dict(vit.named_modules())[layer].register_forward_hook(self._through_grid)

    def _through_grid(self, _module, _args, out):
        prefix, patches = out[:, :1], out[:, 1:]
        grid = self.grid(patches.transpose(1, 2).reshape(len(out), out.shape[2], self.side, self.side))
        return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x):
        out = self.vit(x)
        return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", ["torchvision", "monai"])
def test_grad_cam_on_a_vision_transformers_tokens(kind):
    """Grad-CAM of a ViT block (tokens ``(B, N, D)``, class token first) equals MONAI's Grad-CAM of the same
    tokens laid on the patch grid; the classifier is left as found; the last block's map is flat (only the
    class token reaches the head); Grad-CAM++ is refused. MONAI's ViT returns a tuple and also runs in 3D."""
    import torchvision
    from monai.networks.nets import ViT

    from benchmarks.baselines import grad_cam_layers
    from monai_medcam.visualize import grad_cam

    torch.manual_seed(0)
    if kind == "torchvision":
        net = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3)
        torch.nn.init.normal_(net.heads.head.weight)  # torchvision starts it at zero: no gradient at all
        layer, last = "encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_1"
    else:
        net = ViT(in_channels=3, img_size=32, patch_size=8, hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2,
                  classification=True, num_classes=3, spatial_dims=2)
        layer, last = "blocks.0.norm1", "blocks.1"
    assert grad_cam_layers(net, torch.zeros(1, 3, 32, 32))[:2] == [layer, layer.rsplit(".", 1)[0]]
    x = torch.randn(3, 3, 32, 32)
    label = torch.tensor([0, 2, 1])
    maps = grad_cam(net, x, layer, label)
    assert maps.shape == (3, 1, 32, 32) and net.training  # its mode restored (built in training mode)
    assert all(not m._forward_hooks for m in net.modules()) and all(p.grad is None for p in net.parameters())
    reference = grad_cam(_TokensOnGrid(net, layer, side=4), x, "grid", label)
    assert torch.allclose(maps, reference, atol=1e-5)
    assert all(float(m.amax()) == pytest.approx(1.0) for m in maps)
    assert float((maps[0] - maps[1]).abs().amax()) > 0.1  # another class, another map
    assert float(grad_cam(net, x, last).abs().amax()) == 0.0
    with pytest.raises(ValueError, match="only Grad-CAM is offered for vision transformers"):
        grad_cam(net, x, layer, plus_plus=True)
    if kind == "monai":
        volume = ViT(in_channels=1, img_size=16, patch_size=8, hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2,
                     classification=True, num_classes=2, spatial_dims=3)
        maps = grad_cam(volume, torch.randn(2, 1, 16, 16, 16), "blocks.0")
        assert maps.shape == (2, 1, 16, 16, 16) and float(maps.amax()) == pytest.approx(1.0)


def test_save_evidenced_keeps_going_when_one_format_cannot_be_written(tmp_path, caplog):
    """A NIfTI refused for a series with uneven slice gaps (or a SEG refused) must not stop a bundle's
    whole run: the error is logged, the other formats are written and the image's rows kept."""
    from monai_medcam.io import UNEVEN_SLICES
    from monai_medcam.transforms import SaveEvidenced

    source = MetaTensor(torch.rand(1, 32, 32, 3), affine=torch.eye(4, dtype=torch.float64),
                        meta={"filename_or_obj": "uneven_series", UNEVEN_SLICES: "1.25-202.5 mm"})
    evidence = MetaTensor(torch.zeros(1, 32, 32, 3), meta={"medcam": {"label": torch.tensor([[1, 1, 1]])}})
    evidence[0, 8:16, 8:16, 1] = 1
    save = SaveEvidenced(keys="pred", output_dir=tmp_path / "out", formats="nifti,png")
    with caplog.at_level("ERROR", logger="monai_medcam.transforms"):
        out = save({"pred": evidence, "image_source": source})
    assert "NIfTI not written (ValueError: the source's slices are unevenly spaced (gaps 1.25-202.5 mm)" in caplog.text
    assert [Path(p).name for p in out["pred_files"]] == ["uneven_series_evidence.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv", "uneven_series_evidence.png"]
    assert len(save.rows) == 3


def test_save_evidenced_panels_say_each_slices_decision_and_verdict(tmp_path, drawn_panels):
    """The PNG's rows name the slice, its class and probability, and whether its evidence was
    verified (red where not), from the evidence's diagnostics; vacuous slices are not shown."""
    from monai_medcam.transforms import SaveEvidenced

    source = MetaTensor(torch.rand(1, 32, 32, 3), affine=torch.eye(4, dtype=torch.float64), meta={"filename_or_obj": "series"})
    diagnostics = {"label": torch.tensor([1, 0, 1]), "prob_input": torch.tensor([0.97, 0.99, 0.61]),
                   "prob_evidence": torch.tensor([0.99, 0.9, 0.40]), "verified": torch.tensor([True, True, False]),
                   "settled": torch.tensor([True, True, False]), "vacuous": torch.tensor([False, True, False])}
    evidence = MetaTensor(torch.zeros(1, 32, 32, 3), meta={"medcam": diagnostics})
    evidence[0, 8:16, 8:16, 0] = 1
    evidence[0, 2:30, 2:30, 1] = 1  # the vacuous slice's mask (optimised all the same) is the largest: not shown
    evidence[0, 4:28, 4:28, 2] = 1
    save = SaveEvidenced(keys="pred", output_dir=tmp_path, formats="png", class_names={"1": "lesion"})
    out = save({"pred": evidence, "image_source": source})
    assert [Path(p).name for p in out["pred_files"]] == ["series_evidence.png"]
    (drawn,) = drawn_panels
    assert drawn["titles"] == ["series slice 0 (0-2)\nlesion (prob 0.97)", "series slice 2 (0-2)\nlesion (prob 0.61)"]
    assert drawn["notes"] == {"Med-CAM evidence": [("verified (alone: prob 0.99)", "black"), ("NOT verified (alone: prob 0.40)", "red")]}


def test_volumes_are_reoriented_as_monais_orientation_does_and_their_evidence_comes_back(tmp_path):
    """Reorienting for the classifier is MONAI's ``Orientation`` (array and affine), exactly undone for
    the evidence: a voxel marked in classifier space lands on the source voxel at the same place in
    the world, and per-slice diagnostics follow the source's slice order where the slice axis flips."""
    from monai.transforms import Orientation

    from monai_medcam.io import InputError
    from monai_medcam.orientation import check_orientation, oriented_shape, reorient, reorientation
    from monai_medcam.transforms import SaveEvidenced, ToClassifierSpace, evidence_in_source

    affine = np.array([[0, 0, -2.0, 10], [0.1, -0.8, 0, 5], [1.2, 0, 0.05, -3], [0, 0, 0, 1]])  # axes permuted, flipped, oblique
    image = MetaTensor(torch.rand(1, 5, 6, 7), affine=torch.as_tensor(affine), meta={"filename_or_obj": "vol.nii.gz"})
    for codes in ("RAS", "LPS", "PIL", "SAR"):
        ornt = reorientation(image, codes)
        theirs = Orientation(axcodes=codes, labels=(("L", "R"), ("P", "A"), ("I", "S")))(image.clone())
        assert torch.equal(reorient(image.as_tensor(), ornt), theirs.as_tensor()), codes
        assert oriented_shape(image.shape[1:], ornt) == tuple(theirs.shape[1:])
        assert torch.equal(reorient(reorient(image.as_tensor(), ornt), ornt, inverse=True), image.as_tensor())
        converted = ToClassifierSpace(3, orientation=codes)(image)
        np.testing.assert_allclose(converted.affine.numpy(), theirs.affine.numpy(), atol=1e-9)
        evidence = MetaTensor(torch.zeros(1, *converted.shape[1:]), meta=dict(converted.meta))
        evidence[0, 1, 2, 3] = 1
        mask, _ = evidence_in_source(evidence, image)
        assert int(mask.sum()) == 1 and mask.shape == image.shape
        voxel = np.argwhere(mask[0].numpy())[0]
        np.testing.assert_allclose(affine @ np.r_[voxel, 1], converted.affine.numpy() @ np.array([1, 2, 3, 1.0]), atol=1e-9)
    assert reorientation(MetaTensor(torch.rand(1, 8, 8), affine=torch.eye(3)), "RAS") is None  # 2D images as read
    assert check_orientation(" las ") == "LAS" and check_orientation("none") is None
    for bad in ("RAX", "RRS", "RA", 3):
        with pytest.raises(ValueError, match="three axis codes"):
            ToClassifierSpace(3, orientation=bad)

    # a 2D classifier over an axial volume reoriented to R-A-I: its slices run the other way
    volume = MetaTensor(torch.rand(1, 16, 12, 4), affine=torch.diag(torch.tensor([-1.0, -1.0, 2.0, 1.0], dtype=torch.float64)),
                        meta={"filename_or_obj": str(tmp_path / "axial")})
    converted = ToClassifierSpace(2, 1, size=8, orientation="RAI")(volume)
    assert converted.shape == (1, 8, 8, 4)
    first = torch.nn.functional.interpolate(volume[None, :, :, :, 0].as_tensor().flip(2, 3), size=(8, 8), mode="bilinear",
                                            align_corners=False, antialias=True)[0]
    low, high = volume.min(), volume.max()
    torch.testing.assert_close(converted[..., 3].as_tensor(), (first - low) / (high - low))  # source slice 0 is the last
    evidence = torch.zeros(1, 8, 8, 4)
    evidence[0, :2, :2, 0] = 1  # the classifier's slice 0: the source's slice 3, its far corner
    diagnostics = {"label": torch.tensor([1, 0, 0, 0]), "area": torch.tensor([1 / 16, 0, 0, 0]), "vacuous": torch.tensor([False, True, True, True])}
    data = {"pred": MetaTensor(evidence, meta={**converted.meta, "medcam": diagnostics}), "image_source": volume}
    SaveEvidenced(output_dir=tmp_path / "out", formats=["nifti"])(data)
    import nibabel as nib

    mask = np.asarray(nib.load(tmp_path / "out" / "axial_evidence.nii.gz").dataobj)
    expected = np.zeros((16, 12, 4), np.uint8)
    expected[-4:, -3:, 3] = 1
    np.testing.assert_array_equal(mask, expected)
    rows = [line.split(",") for line in (tmp_path / "out" / "summary.csv").read_text().splitlines()[1:]]
    assert [(r[1], r[3]) for r in rows] == [("0", "0"), ("1", "0"), ("2", "0"), ("3", "1")]  # slice, label
    with pytest.raises(InputError, match="sliced along its axis 1"):  # slices across the source's own: refused
        ToClassifierSpace(2, 1, size=8, orientation="RSA")(volume)
    with pytest.raises(ValueError, match="needs the volume's affine"):
        ToClassifierSpace(2, 1, size=8, orientation="RAS")(volume.as_tensor())

    # a DataLoader batch of a volume already R-A-S and one that is not: each one's evidence comes back to it
    from monai.data import decollate_batch, list_data_collate

    from monai_medcam.transforms import ToClassifierSpaced

    ras = MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.eye(4, dtype=torch.float64))
    lps = MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)))
    convert = ToClassifierSpaced("image", spatial_dims=3, size=8, orientation="RAS")
    for order in ((ras, lps), (lps, ras)):
        batch = list_data_collate([convert({"image": v}) for v in order])
        evidence = torch.zeros(2, 1, 8, 8, 8)
        evidence[:, 0, 0, 0, 0] = 1
        pred = MetaTensor(evidence, meta=batch["image"].meta)
        pred.is_batch = True
        for item, source in zip(decollate_batch({"pred": pred, "image_source": batch["image_source"]}), order):
            mask, _ = evidence_in_source(item["pred"], source)
            assert mask[0, 7, 7, 0] == 1 if source is lps else mask[0, 0, 0, 0] == 1


def test_the_classifiers_own_preprocessing_is_inverted_onto_the_source(tmp_path):
    """The README's recipe: a classifier's own MONAI preprocessing (Orientationd, Spacingd, an
    intensity window, a crop or pad to its size) before ``MedCAMInferer``, and MONAI's ``Invertd``
    after it, put the evidence on the source's voxels: a voxel marked in classifier space lands on
    the source voxels at the same place in the world, and the README's recipe writes a NIfTI with
    the source's grid and one evidence slice per slice whose decision needed evidence."""
    import nibabel as nib
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.transforms import (
        EnsureChannelFirstd, Invertd, LoadImaged, Orientationd, ResizeWithPadOrCropd, ScaleIntensityRanged, Spacingd,
    )

    affine = np.diag([-0.8, -1.2, 2.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    volume = np.random.default_rng(0).uniform(-1000, 0, (40, 30, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "ct.nii.gz")
    preprocessing = Compose([
        LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=(1.6, 1.2, 2.0)), ScaleIntensityRanged("image", a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True),
        ResizeWithPadOrCropd("image", (16, 32, 16)),  # x cropped (20 -> 16), y padded (30 -> 32), z cropped (20 -> 16)
    ])
    batch = next(iter(DataLoader(Dataset([{"image": str(tmp_path / "ct.nii.gz")}], preprocessing), batch_size=1)))
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())
    evidence = MedCAMInferer(spatial_dims=3, steps=2, max_retries=0)(batch["image"], net)
    assert evidence.shape == (1, 1, 16, 32, 16) and "label" in evidence.meta["medcam"]
    evidence.zero_()  # in place: the metadata MONAI inverts by stays
    evidence[0, 0, 4, 5, 6] = 1
    batch["evidence"] = evidence
    item = Invertd("evidence", transform=preprocessing, orig_keys="image", nearest_interp=True)(decollate_batch(batch)[0])
    back = item["evidence"]
    assert back.shape == (1, 40, 30, 20)
    np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-6)
    marked = np.argwhere(back[0].numpy() > 0.5)
    assert 1 <= len(marked) <= 2  # one classifier voxel: two source voxels along x at most (1.6 mm over 0.8 mm)
    world = (affine @ np.c_[marked, np.ones(len(marked))].T)[:3].mean(1)
    target = batch["image"].affine[0].numpy() @ np.array([4, 5, 6, 1.0])
    assert np.abs(world - target[:3]).max() <= 0.41, (world, target)  # within half a source voxel (0.4 mm along x)

    # the README's recipe, as written there (fewer steps)
    recipe = (Path(__file__).parents[1] / "README.md").read_text().split("# -- own preprocessing --\n")[1].split("```")[0]
    recipe = recipe.replace("steps=100", "steps=5").replace('output_dir="my_evidence_invertd"', f'output_dir="{tmp_path / "out"}"')
    recipe = recipe.replace('"bundles/', f'"{Path(__file__).parents[1]}/bundles/')  # wherever the tests run from
    printed = []
    exec(compile(recipe, "README.md", "exec"), {"print": printed.append})
    written = nib.load(tmp_path / "out" / "brain_evidence.nii.gz")
    source = nib.load(Path(__file__).parents[1] / "bundles" / "medcam_explain" / "sample_data" / "brain.nii.gz")
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    mask = np.asarray(written.dataobj)
    needed = [not v for v in printed[0]["vacuous"]]
    assert set(np.unique(mask)) <= {0, 1} and any(needed)
    assert [bool(mask[..., k].any()) for k in range(mask.shape[-1])] == needed  # evidence on the slices that needed it
