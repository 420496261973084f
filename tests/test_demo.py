"""The embedded demo: known-evidence data, the committed classifier, and the demo run end to end."""

from __future__ import annotations

import csv

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


def test_demo_command_writes_pictures_and_table(tmp_path, monkeypatch, capsys):
    from monai_medcam.demo import run as demo_run

    real = demo_run.run_demo
    monkeypatch.setattr(demo_run, "run_demo", lambda output, count, device: real(output, count, device, steps=40, min_steps=10))
    code = main(["demo", "--output", str(tmp_path), "--count", "2"])
    out = capsys.readouterr().out
    assert "panels.png" in out
    assert (tmp_path / "panels.png").stat().st_size > 10_000
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 2 and {"label", "prob_evidence", "area", "verified", "lesion_iou"} <= set(rows[0])
    masks = [np.load(tmp_path / f"evidence_{i}.npy") for i in range(2)]
    assert all(m.shape == (96, 96) and set(np.unique(m)) <= {0, 1} for m in masks)
    assert code == (0 if all(r["verified"] == "True" for r in rows) else 1)
    assert not list(tmp_path.glob(".*tmp*"))
