"""The embedded demo: known-evidence data, the committed classifier, and the demo run end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from monai_medcam.cli import main
from monai_medcam.demo import demo_classifier, make_known_evidence

pytest.importorskip("skimage")


def test_known_evidence_images_and_masks():
    data = make_known_evidence(6, 64, seed=1)
    assert data.images.shape == (6, 3, 64, 64) and data.images.dtype == np.float32
    assert 0 <= data.images.min() and data.images.max() <= 1
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    lesion_pixels = data.lesion_masks.sum((1, 2, 3))
    assert (lesion_pixels[data.labels == 0] == 0).all() and (lesion_pixels[data.labels == 1] > 10).all()
    assert (data.distractor_masks.sum((1, 2, 3)) > 0).all()
    assert not (data.lesion_masks * data.distractor_masks).any()
    again = make_known_evidence(6, 64, seed=1)
    assert np.array_equal(data.images, again.images)
    gray = make_known_evidence(2, 32, background="ihc", lesion="spots", channels=1)
    assert gray.images.shape == (2, 1, 32, 32)


def test_known_evidence_bad_arguments():
    with pytest.raises(ValueError, match="lesion must be one of"):
        make_known_evidence(2, lesion="blob")
    with pytest.raises(ValueError, match="background must be one of"):
        make_known_evidence(2, background="xray")


def test_demo_classifier_is_accurate_on_fresh_images():
    data = make_known_evidence(40, 96, seed=999)
    with torch.no_grad():
        predictions = demo_classifier()(torch.from_numpy(data.images)).argmax(1).numpy()
    assert (predictions == data.labels).mean() >= 0.9


def test_demo_classifier_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        demo_classifier(tmp_path / "absent.pt")


def test_demo_command_runs_the_whole_path(tmp_path, capsys):
    """`medcam demo` (fewer steps): fundus panels, then DICOM/NIfTI/PNG in and valid SEG, NIfTI, PNG out."""
    import nibabel
    import pydicom

    from tests.test_radiology_io import dciodvfy_errors

    code = main(["demo", "--output", str(tmp_path), "--count", "2", "--steps", "40"])
    out = capsys.readouterr().out
    assert code == 0, out
    known = tmp_path / "known_evidence"
    assert (known / "panels.png").stat().st_size > 10_000
    rows = list(csv.DictReader((known / "summary.csv").open()))
    assert len(rows) == 2 and {"label", "prob_evidence", "area", "verified", "lesion_iou"} <= set(rows[0])
    masks = [np.load(known / f"evidence_{i}.npy") for i in range(2)]
    assert all(m.shape == (96, 96) and set(np.unique(m)) <= {0, 1} for m in masks)

    evidence = tmp_path / "radiology" / "evidence"
    for name in ("mr_series", "chest_cr"):
        seg = evidence / f"{name}_evidence_seg.dcm"
        assert pydicom.dcmread(seg).Modality == "SEG"
        assert dciodvfy_errors(seg) == []
    series = sorted((tmp_path / "radiology" / "inputs" / "mr_series").iterdir())
    assert dciodvfy_errors(series[-1]) == []  # the demo's own sources are valid DICOM (its z 24.2 had 18 characters)
    seg = pydicom.dcmread(evidence / "mr_series_evidence_seg.dcm")  # one frame per instance and segment (verified or not)
    assert int(seg.NumberOfFrames) == len(seg.SegmentSequence) * len(series) == len(seg.SegmentSequence) * 12
    for name in ("mr_series", "chest_cr", "brain", "fundus"):
        assert (evidence / f"{name}_evidence.png").stat().st_size > 10_000
        assert nibabel.load(evidence / f"{name}_evidence.nii.gz").shape[:2] != (64, 64)  # source geometry, not 64 px
    brain = nibabel.load(tmp_path / "radiology" / "inputs" / "brain.nii.gz")
    assert np.allclose(nibabel.load(evidence / "brain_evidence.nii.gz").affine, brain.affine)
    rows = list(csv.DictReader((evidence / "summary.csv").open()))
    assert len(rows) == 12 + 1 + 24 + 1  # one row per slice or 2D image
    record = json.loads((evidence / "run.json").read_text())  # the run's record, as medcam explain writes it
    written = sorted(f"{name}_evidence{suffix}" for name in ("brain", "chest_cr", "fundus", "mr_series")
                     for suffix in ("_seg.dcm", ".nii.gz", ".png") if suffix != "_seg.dcm" or name in ("chest_cr", "mr_series"))
    assert record["status"] == "finished" and record["outcome"] == {"explained": 4, "failed": 0, "failures": {}, "files": written}
    assert record["command"]["argv"] == ["medcam", "demo", "--output", str(tmp_path), "--count", "2", "--steps", "40"]
    assert record["classifier"]["files"][0]["path"].endswith("radiology_classifier.pt")
    assert record["settings"]["given"] == {"skip_vacuous": True, "steps": 40}
    assert "of the evidence lies on the known lesion" in out and "radiology/evidence" in out
    assert not list(tmp_path.rglob(".tmp*"))


def test_fit_channels_last_changes_the_layout_not_the_training():
    """Channels-last training (the benchmark's, for depthwise-convolution networks on CPU) gives the
    same network up to float rounding, handed back in the default memory format."""
    from monai_medcam.demo.train import fit

    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # not the global RNG: earlier tests move it
    y = (x[:, 0, 4:8, 4:8].mean((1, 2)) > 0.5).long()

    def untrained() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2),
        )

    def trained(channels_last: bool) -> torch.nn.Module:
        net = untrained()
        return fit(net, x, y, epochs=2, max_lr=1e-2, weight_decay=0.0, channels_last=channels_last)

    start, plain, last = untrained(), trained(False), trained(True)
    for a, b, a0 in zip(plain.parameters(), last.parameters(), start.parameters()):
        assert b.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert (a - a0).abs().max() > 1e-3  # every tensor moved: it did train


def test_fit_channels_last_refuses_volumes():
    from monai_medcam.demo.train import fit

    with pytest.raises(ValueError, match=r"channels_last needs 2D images .*\(4, 1, 8, 8, 8\)"):
        fit(torch.nn.Conv3d(1, 2, 1), torch.rand(4, 1, 8, 8, 8), torch.zeros(4, dtype=torch.long), 1, 1e-3, 0.0, channels_last=True)


def test_fit_refuses_fewer_images_than_a_batch_and_trains_smaller_batches():
    from monai_medcam.demo.train import fit

    x, y = torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one batch of 32 images; got 8"):
        fit(torch.nn.Conv2d(1, 2, 4), x, y, 1, 1e-2, 0.0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 4), torch.nn.Flatten())
    before = [p.detach().clone() for p in net.parameters()]
    fit(net, x, y, 1, 1e-2, 0.0, batch_size=4)  # two batches of 4
    assert all((p - b).abs().max() > 0 for p, b in zip(net.parameters(), before))


def test_lesion_overlap_counts_evidence_per_slice(tmp_path):
    import nibabel

    from monai_medcam.demo.run import lesion_overlap

    lesion = np.zeros((8, 8, 4), bool)
    lesion[2:4, 2:4, 1] = True  # 4 voxels on slice 1
    evidence = np.zeros((8, 8, 4), np.uint8)
    evidence[2:4, 2:5, 1] = 1  # 6 voxels on slice 1, 4 of them on the lesion
    evidence[0, 0, 3] = 1  # a lesion-free slice with evidence
    path = tmp_path / "e.nii.gz"
    nibabel.save(nibabel.Nifti1Image(evidence, np.eye(4)), path)
    overlap = lesion_overlap(path, lesion)
    assert (overlap.lesion_slices, overlap.lesion_free_slices, overlap.lesion_free_with_evidence) == (1, 3, 1)
    assert overlap.on_lesion == pytest.approx(4 / 6)
    assert str(overlap) == "67% of the evidence lies on the known lesion (on the 1 slice(s) with it); 1 of 3 lesion-free slice(s) hold evidence"
    nibabel.save(nibabel.Nifti1Image(evidence[..., 1], np.eye(4)), path)  # a 2D image: no slice counts
    assert str(lesion_overlap(path, lesion[..., 1])) == "67% of the evidence lies on the known lesion"
    with pytest.raises(ValueError, match="differs from the lesion's"):
        lesion_overlap(path, lesion)
