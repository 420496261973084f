"""The MONAI bundle ``bundles/medcam_explain``: metadata, network, workflow end to end, torchrun on CPU."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("jsonschema")
pytest.importorskip("fire")

from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "medcam_explain"
CONFIGS = BUNDLE / "configs"
INFERENCE = str(CONFIGS / "inference.json")
MULTI_GPU = str(CONFIGS / "multi_gpu_inference.json")
METADATA = str(CONFIGS / "metadata.json")
SCHEMA = str(CONFIGS / "meta_schema.json")


def _rows(folder: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(folder.glob("summary*.csv")):
        with path.open() as handle:
            rows += [dict(row, file=path.name) for row in csv.DictReader(handle)]
    return rows


def test_bundle_layout():
    for name in ("configs/metadata.json", "configs/inference.json", "configs/multi_gpu_inference.json",
                 "configs/logging.conf", "docs/README.md", "LICENSE", "models/model.pt"):
        assert (BUNDLE / name).is_file(), name
    readme = (BUNDLE / "docs" / "README.md").read_text()
    for section in ("Model overview", "Data", "Input", "Output", "Performance", "Bundle commands", "References", "License"):
        assert f"## {section}" in readme, section
    # the checkpoint is a plain state dict
    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_metadata_verifies_offline_and_schema_rejects_bad_metadata(tmp_path):
    verify_metadata(meta_file=METADATA, filepath=SCHEMA)
    bad = json.loads(Path(METADATA).read_text())
    del bad["network_data_format"]
    bad_file = tmp_path / "metadata.json"
    bad_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(bad_file), filepath=SCHEMA)


def test_network_input_output_verifies():
    verify_net_in_out(net_id="network_def", meta_file=METADATA, config_file=INFERENCE, device="cpu")


def test_class_names_come_from_the_metadata_where_it_has_them(tmp_path):
    """SaveEvidenced names the classes as metadata.json's channel_def does; metadata without one
    (or none at all) leaves them unnamed, and the bundle still builds."""
    import json

    from monai.bundle import ConfigParser

    meta = json.loads(Path(METADATA).read_text())
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    for meta_file, expected in ((METADATA, {0: "no lesion", 1: "lesion"}), (str(tmp_path / "metadata.json"), {}), (None, {})):
        parser = ConfigParser()
        parser.read_config(INFERENCE)
        parser.read_meta(meta_file or {})
        parser.update({"bundle_root": str(BUNDLE), "output_dir": str(tmp_path / "out")})
        (save,) = parser.get_parsed_content("postprocessing").transforms
        assert save.class_names == expected, meta_file


def test_config_workflow_runs_and_writes_evidence(tmp_path, drawn_panels):
    output = tmp_path / "eval"
    workflow = ConfigWorkflow(
        config_file=INFERENCE, meta_file=METADATA, logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="infer", bundle_root=str(BUNDLE), output_dir=str(output), steps=5,
    )
    workflow.initialize()
    assert not workflow.check_properties()  # every required infer property is there
    workflow.run()
    workflow.finalize()

    expected = {"mr_series": 12, "brain": 24, "fundus": 1}  # rows: one per slice for the 2D classifier
    for name in expected:
        assert (output / f"{name}_evidence.nii.gz").is_file()
        assert (output / f"{name}_evidence.png").stat().st_size > 1000
    assert (output / "mr_series_evidence_seg.dcm").is_file()
    assert not (output / "brain_evidence_seg.dcm").exists()  # SEG only for DICOM sources
    rows = _rows(output)
    counts = {name: sum(Path(r["input"]).name.startswith(name) for r in rows) for name in expected}
    assert counts == expected
    for row in rows:
        assert 0.0 <= float(row["area"]) <= 1.0 and row["label"] in ("0", "1")

    # NIfTI evidence lies on the source voxels: same shape and affine as the source volume
    source = nib.load(BUNDLE / "sample_data" / "brain.nii.gz")
    evidence = nib.load(output / "brain_evidence.nii.gz")
    assert evidence.shape == source.shape
    np.testing.assert_allclose(evidence.affine, source.affine, atol=1e-5)
    values = np.asarray(evidence.dataobj)
    assert values.any() and set(np.unique(values)) <= {0, 1, 2}
    from monai_medcam.visualize import evidence_not_verified

    # 2 on exactly the slices whose evidence was not verified (5 steps: some are not)
    failed = {int(r["slice"]) for r in rows if Path(r["input"]).name.startswith("brain") and evidence_not_verified(r)}
    assert {k for k in range(values.shape[-1]) if (values[..., k] == 2).any()} == {k for k in failed if values[..., k].any()}

    # the DICOM SEG has one frame per source instance (and segment: verified or not), referencing the series
    import highdicom as hd

    seg = hd.seg.segread(output / "mr_series_evidence_seg.dcm")
    assert seg.number_of_frames == 12 * len(seg.segment_numbers)
    # the panels name each row's class as metadata.json's channel_def does
    titles = [t for call in drawn_panels for t in call["titles"]]
    assert titles and all(t.split("\n")[1].split(" (prob ")[0] in ("no lesion", "lesion") for t in titles), titles


def _small_inputs(folder: Path, count: int) -> list[str]:
    from PIL import Image
    from skimage.data import retina

    folder.mkdir()
    gray = retina().mean(-1)
    names = []
    for k in range(count):
        crop = gray[200 + 40 * k : 296 + 40 * k, 300:396]
        Image.fromarray(crop.astype(np.uint8)).save(folder / f"case{k}.png")
        names.append(f"case{k}.png")
    return names


@pytest.mark.timeout(600)
def test_torchrun_two_processes_split_inputs_exactly_once(tmp_path):
    """Each input explained once by one of two processes; two inputs named alike (``case0.png`` and
    ``other/case0.png``) keep an output each, named by their paths whichever ranks they fall on."""
    names = _small_inputs(tmp_path / "data", 5)  # 5 over 2 ranks: not evenly divisible
    (tmp_path / "data" / "other").mkdir()
    (tmp_path / "data" / names[4]).rename(tmp_path / "data" / "other" / names[0])
    names[4] = names[0]
    output = tmp_path / "eval"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle", "run",
        "--config_file", f"['{INFERENCE}','{MULTI_GPU}']", "--meta_file", METADATA, "--bundle_root", str(BUNDLE),
        "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(output), "--steps", "3",
        "--formats", "png",  # one format as a plain string (it used to be split into letters)
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(output)
    assert {r["file"] for r in rows} == {"summary_rank0.csv", "summary_rank1.csv"}  # both ranks worked
    explained = sorted(Path(r["input"]).name for r in rows)
    assert explained == sorted(names)  # each input exactly once: none lost, none duplicated
    per_rank = sorted(sum(r["file"] == f"summary_rank{k}.csv" for r in rows) for k in (0, 1))
    assert per_rank == [2, 3]
    outputs = sorted(p.name for p in output.glob("*_evidence.png"))
    assert outputs == sorted(["data_case0_evidence.png", "other_case0_evidence.png", "case1_evidence.png", "case2_evidence.png",
                              "case3_evidence.png"])
    assert sorted(r["evidence"] for r in rows) == sorted(name[: -len("_evidence.png")] for name in outputs)
    assert not list(output.glob("*.nii.gz"))  # png only


def test_classifier_loads_from_the_bundle_folder():
    from monai_medcam.loading import load_classifier

    loaded = load_classifier(str(BUNDLE))
    assert (loaded.spatial_dims, loaded.channels, loaded.size) == (2, 1, (64, 64))
    assert loaded.network(torch.rand(2, 1, 64, 64)).shape == (2, 2)


def test_sample_data_script_rewrites_the_embedded_data(tmp_path):
    root = tmp_path / "bundle"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(BUNDLE / "scripts" / "make_sample_data.py", root / "scripts")
    subprocess.run([sys.executable, str(root / "scripts" / "make_sample_data.py")], check=True, timeout=300)
    made = sorted(p.name for p in (root / "sample_data").iterdir())
    assert made == sorted(p.name for p in (BUNDLE / "sample_data").iterdir())
    assert sorted(p.name for p in root.iterdir()) == ["sample_data", "scripts"]  # no staging folder left


def test_whole_slide_config_runs_the_tiled_path(tmp_path):
    pytest.importorskip("openslide")
    slide = tmp_path / "slide.tif"  # absent: the config writes the demo slide there first (it is the sample slide)
    output = tmp_path / "eval_wsi"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "wsi_inference.json"),
        "--meta_file", METADATA, "--bundle_root", str(BUNDLE), "--output_dir", str(output), "--steps", "30",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run(command + ["--sample_slide", str(slide)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert slide.is_file()
    assert sorted(p.name for p in output.iterdir()) == ["slide_evidence.tif", "slide_thumbnail.png", "slide_tiles.csv"]
    with (output / "slide_tiles.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 52  # the tissue tiles of level 2 at 64 px
    assert sorted((int(r["row"]), int(r["col"])) for r in rows if r["label"] == "1") == [(1, 5), (5, 5), (6, 1)]  # the lesions

    # a slide of the user's that is not there: an error naming it; no demo slide written under its name
    absent = tmp_path / "typo" / "slide.svs"
    done = subprocess.run(command + ["--slide", str(absent), "--sample_slide", str(slide)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode != 0 and f"{absent}: no such slide file" in done.stderr, done.stderr[-3000:]
    assert not absent.parent.exists()
