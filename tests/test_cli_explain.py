"""``medcam explain`` end to end: classifier loading (safe only), inputs good and bad, outputs and exit status."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("highdicom")
from pydicom.data import get_testdata_file  # noqa: E402

from monai_medcam.cli import main  # noqa: E402
from monai_medcam.demo.classifier import RADIOLOGY_CHECKPOINT, build_radiology_network  # noqa: E402
from monai_medcam.loading import load_classifier  # noqa: E402

TEST_FILES = Path(get_testdata_file("MR_small.dcm", download=False)).parent
FACTORY = "python:monai_medcam.demo.classifier:build_radiology_network"
FAST = ["--steps", "20", "--size", "64", "--no-progress", "--seed", "0"]


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(TEST_FILES / "MR_small.dcm", folder / "mr.dcm")
    shutil.copy(TEST_FILES / "CT_small.dcm", folder / "ct.dcm")
    shutil.copy(TEST_FILES / "rtplan.dcm", folder / "plan.dcm")
    (folder / "notes.txt").write_text("not an image")
    (folder / "damaged").mkdir()
    shutil.copy(TEST_FILES / "MR_truncated.dcm", folder / "damaged" / "truncated.dcm")
    return folder


def test_explain_writes_outputs_and_reports_failures(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(inputs),
                 "--output", str(out), "--format", "seg,nifti,png", "--gradcam-layer", "layer4", *FAST])
    printed = capsys.readouterr().out
    assert code == 1  # one input failed
    assert "FAILED" in printed and "truncated.dcm: cannot read the image" in printed
    # in a folder, files with no image (a plan, a text file) are passed over, not failed
    assert "skipped 2 file(s) without an image" in printed
    assert f"FAILED {inputs / 'plan.dcm'}" not in printed and f"FAILED {inputs / 'notes.txt'}" not in printed
    assert "2 input(s) explained, 1 failed" in printed
    assert "verified  settled" in printed  # the console table counts both per input
    for name in ("mr", "ct"):
        assert (out / f"{name}_evidence_seg.dcm").stat().st_size > 0
        assert (out / f"{name}_evidence.nii.gz").stat().st_size > 0
        assert (out / f"{name}_evidence.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert sorted((Path(r["input"]).name, r["evidence"]) for r in rows) == [("ct.dcm", "ct"), ("mr.dcm", "mr")]
    for row in rows:
        assert row["label"] in ("0", "1") and 0 < float(row["area"]) <= 1 and 0 <= float(row["prob_input"]) <= 1
        assert row["settled"] in ("True", "False") and (row["settled"] == "False" or row["verified"] == "True")
        assert int(row["retries"]) >= 0 and int(row["steps"]) > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_only_files_without_an_image_and_a_plan_given_by_name(inputs, tmp_path, capsys):
    (inputs / "damaged" / "truncated.dcm").unlink()
    for name in ("mr.dcm", "ct.dcm"):
        (inputs / name).unlink()
    args = ["--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--output", str(tmp_path / "o"), *FAST]
    assert main(["explain", "--input", str(inputs), *args]) == 2
    assert "error: no image to explain in" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["explain", "--input", str(inputs / "plan.dcm"), *args]) == 1  # named: an error like any other
    assert "plan.dcm: DICOM file has no pixel data" in capsys.readouterr().out


def test_a_rerun_replaces_the_summary_and_an_interrupt_exits_130(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.csv").write_text("input,area\nold.dcm,0.5\n")  # an earlier run's
    args = ["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--output", str(out), *FAST]
    assert main([*args, "--input", str(TEST_FILES / "MR_truncated.dcm")]) == 1
    assert (out / "summary.csv").read_text().splitlines()[1:] == []  # this run wrote nothing: no row, not the old ones
    import monai_medcam.pipeline

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(monai_medcam.pipeline, "explain_inputs", interrupted)
    assert main([*args, "--input", str(TEST_FILES / "MR_small.dcm")]) == 130
    assert ("interrupted: every output written so far is whole (written, then renamed); summary.csv and run.json list the inputs "
            "explained and the files written.") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--input", str(TEST_FILES / "MR_small.dcm"), "--size", "0,64"])
    assert "--size: must be sides of at least 1, not '0,64'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--input", str(TEST_FILES / "MR_small.dcm"), "--size", "64,,64"])
    assert "--size: must be sides separated by ',' or 'x', each given, not '64,,64'" in capsys.readouterr().err


def test_a_failed_inputs_files_from_an_earlier_run_are_kept_and_named_as_such(tmp_path, capsys, monkeypatch):
    source, out = tmp_path / "mr.dcm", tmp_path / "o"
    shutil.copy(TEST_FILES / "MR_small.dcm", source)
    args = ["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(source),
            "--output", str(out), "--format", "nifti,png", *FAST]
    assert main(args) == 0
    before = {name: (out / name).read_bytes() for name in ("mr_evidence.nii.gz", "mr_evidence.png")}
    shutil.copy(TEST_FILES / "MR_truncated.dcm", source)  # the same input, damaged since
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "cannot read the image" in printed
    assert "(left from an earlier run, not this one's: mr_evidence.nii.gz, mr_evidence.png)" in printed
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing already written is lost

    import monai_medcam.writers

    def broken(*_, **__):
        raise OSError("disk quota exceeded")

    shutil.copy(TEST_FILES / "MR_small.dcm", source)
    monkeypatch.setattr(monai_medcam.writers, "write_png", broken)
    assert main(args) == 1  # the NIfTI is this run's, the PNG the earlier one's
    printed = capsys.readouterr().out
    assert ("PNG not written (OSError: disk quota exceeded); written: mr_evidence.nii.gz "
            "(left from an earlier run, not this one's: mr_evidence.png)") in printed, printed


def test_all_good_inputs_exit_zero_and_png_only(tmp_path, capsys):
    code = main(["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input",
                 str(TEST_FILES / "MR_small.dcm"), "--output", str(tmp_path / "o"), "--format", "png", *FAST])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["MR_small_evidence.png", "run.json", "summary.csv"]


def test_run_json_records_the_run_as_given_and_as_it_ended(tmp_path, monkeypatch, caplog):
    """run.json beside the outputs: the command, the classifier's files by SHA-256, the settings as
    given and as run, the versions, and how the run ended (counts; "interrupted" when it was)."""
    import hashlib
    from importlib import metadata

    import monai_medcam
    import monai_medcam.pipeline
    import monai_medcam.provenance

    out = tmp_path / "o"
    args = ["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(TEST_FILES / "MR_small.dcm"),
            str(tmp_path / "missing.dcm"), "--output", str(out), "--format", "nifti", *FAST]
    load_image, seen = monai_medcam.pipeline.load_image, []

    def reading(item):  # while the run works, its record says so
        seen.append(json.loads((out / "run.json").read_text())["status"])
        return load_image(item)

    monkeypatch.setattr(monai_medcam.pipeline, "load_image", reading)
    assert main(args) == 1  # one input missing
    record = json.loads((out / "run.json").read_text())
    assert seen == ["running"]
    missing = str(tmp_path / "missing.dcm")
    assert record["status"] == "finished" and record["outcome"] == {"explained": 1, "failed": 1, "failures": {missing: "no such file or folder."},
                                                                    "files": ["MR_small_evidence.nii.gz"]}
    assert record["command"]["argv"] == ["medcam", *args] and record["ended"] >= record["started"]
    assert record["command"]["pid"] == os.getpid() and record["command"]["host"] == socket.gethostname()
    (weights,) = record["classifier"]["files"]
    assert weights["sha256"] == hashlib.sha256(RADIOLOGY_CHECKPOINT.read_bytes()).hexdigest()
    assert weights["bytes"] == RADIOLOGY_CHECKPOINT.stat().st_size and record["classifier"]["source"] == FACTORY
    assert record["settings"]["given"] == {"steps": 20, "seed": 0}
    resolved = record["settings"]["resolved"]
    assert resolved["steps"] == 20 and resolved["late_bin_weight"] == 100.0 and resolved["verify_seed"] == 0  # 2D defaults filled in
    assert [layer["name"] for layer in record["target_layers"]] == ["act", "layer1", "layer2", "layer3", "layer4"]
    assert record["device"] == "cpu" and record["versions"]["torch"] == metadata.version("torch")
    assert record["versions"]["monai_medcam"]["version"] == monai_medcam.__version__ and record["versions"]["monai"] == metadata.version("monai")

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(monai_medcam.pipeline, "load_image", interrupted)
    assert main(args) == 130
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["outcome"]["error"] == "KeyboardInterrupt: "
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]

    def broken(*_, **__):
        raise RuntimeError("disk gone")

    def broken_disk(*_, **__):
        raise OSError("No space left on device")

    monkeypatch.setattr(monai_medcam.pipeline, "load_image", load_image)
    pending = monai_medcam.pipeline._Pending
    monkeypatch.setattr(monai_medcam.pipeline, "_Pending", broken)  # outside the per-input handling
    with pytest.raises(RuntimeError, match="disk gone"):
        main(args)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["outcome"] == {"explained": 0, "failed": 1, "failures": {missing: "no such file or folder."},
                                                                  "files": [], "error": "RuntimeError: disk gone"}
    # where the record cannot be written (a full disk), the run's outputs stand, with a warning
    monkeypatch.setattr(monai_medcam.pipeline, "_Pending", pending)
    monkeypatch.setattr(monai_medcam.provenance, "atomic_path", broken_disk)
    (out / "run.json").unlink()
    with caplog.at_level("WARNING", logger="monai_medcam.provenance"):
        assert main(args) == 1
    assert (out / "MR_small_evidence.nii.gz").is_file() and not (out / "run.json").exists()
    assert "run.json: the run's record was not written (OSError: No space left on device)" in caplog.text


def test_a_stopped_run_leaves_each_inputs_files_from_one_run_and_the_next_cleans_up(tmp_path, monkeypatch, capsys):
    # SIGTERM (a scheduler stopping the job) stops the run as Ctrl-C does: exit 143, its record
    # "interrupted"; an input's formats are renamed into place together, so an interrupt while
    # they are written leaves the earlier run's set whole; a second run into the folder is
    # refused while one runs; temporaries a killed run left of this run's files are removed
    import monai_medcam.writers

    out = tmp_path / "o"
    args = ["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(TEST_FILES / "MR_small.dcm"),
            "--output", str(out), "--format", "nifti,png", *FAST]
    assert main(args) == 0
    earlier = {name: (out / name).read_bytes() for name in ("MR_small_evidence.nii.gz", "MR_small_evidence.png")}
    write_png = monai_medcam.writers.write_png

    def killed_while_writing(*a, **k):  # the NIfTI is written (under its temporary name), then SIGTERM
        assert list(out.glob(".tmp-*MR_small_evidence.nii.gz"))
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(monai_medcam.writers, "write_png", killed_while_writing)
    handler = signal.getsignal(signal.SIGTERM)
    assert main([*args[:-2], "--seed", "1"]) == 143
    assert "terminated (SIGTERM): every output written so far is whole" in capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["outcome"]["error"] == "Terminated: signal 15"
    assert record["outcome"]["files"] == [] and {name: (out / name).read_bytes() for name in earlier} == earlier
    assert not list(out.glob(".tmp-*")) and signal.getsignal(signal.SIGTERM) == handler  # the handler before is back

    monkeypatch.setattr(monai_medcam.writers, "write_png", write_png)
    left = [out / ".tmp-99999999-summary.csv", out / ".tmp-99999999-MR_small_evidence.nii.gz"]
    others = [out / ".tmp-99999999-notes.txt", out / "notes.txt"]  # not this run's: left alone
    for path in left + others:
        path.write_text("torn")
    fcntl = pytest.importorskip("fcntl")
    with (out / ".medcam.lock").open("a") as held:  # another run, writing into the folder now
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(args) == 2
        assert f"output folder {out}: another run is writing there (it holds {out / '.medcam.lock'})" in capsys.readouterr().err
        assert all(path.exists() for path in left)
    assert main(args) == 0
    assert not any(path.exists() for path in left) and all(path.exists() for path in others)
    assert not (out / ".medcam.lock").exists()
    # a file that cannot be replaced (summary.csv a folder here): one line, exit 2, no temporary left
    (out / "summary.csv").unlink()
    (out / "summary.csv").mkdir()
    assert main(args) == 2
    assert f"error: [Errno 21] Is a directory: '{out / '.tmp-'}" in capsys.readouterr().err
    assert not list(out.glob(".tmp-*summary*"))


def test_pickled_classifier_is_refused(tmp_path, capsys):
    pickled = tmp_path / "model.pt"
    torch.save(build_radiology_network(), pickled)  # a whole module: a pickle of arbitrary objects
    code = main(["explain", "--classifier", str(pickled), "--input", str(TEST_FILES / "MR_small.dcm"),
                 "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{pickled}: refused: not a TorchScript archive" in err
    code = main(["explain", "--classifier", FACTORY, "--weights", str(pickled), "--input",
                 str(TEST_FILES / "MR_small.dcm"), "--output", str(tmp_path / "o")])
    assert code == 2 and "refused: not a plain state dict loadable with weights_only=True" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unreadable_input_path(tmp_path, capsys):
    code = main(["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input",
                 str(tmp_path / "absent"), "--output", str(tmp_path / "o"), *FAST])
    assert code == 1 and "absent: no such file or folder" in capsys.readouterr().out


def test_torchscript_and_bundle_classifiers(tmp_path):
    network = build_radiology_network()
    network.load_state_dict(torch.load(RADIOLOGY_CHECKPOINT, weights_only=True))
    scripted = tmp_path / "model.ts"
    torch.jit.script(network.eval()).save(str(scripted))
    loaded = load_classifier(scripted)
    assert (loaded.spatial_dims, loaded.channels, loaded.target_layers) == (2, 1, [])
    x = torch.rand(2, 1, 64, 64)
    assert torch.allclose(loaded.network(x), network(x), atol=1e-5)

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps(
        {"network_def": {"_target_": "monai_medcam.demo.classifier.build_radiology_network"}}))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(
        {"network_data_format": {"inputs": {"image": {"num_channels": 1, "spatial_shape": [64, 64]}},
                                 "outputs": {"pred": {"channel_def": {"0": "no lesion", "1": "lesion"}}}}}))
    shutil.copy(RADIOLOGY_CHECKPOINT, bundle / "models" / "model.pt")
    loaded = load_classifier(bundle)
    assert (loaded.spatial_dims, loaded.channels, loaded.size, loaded.target_layers) == (2, 1, (64, 64), "auto")
    assert loaded.class_names == {"0": "no lesion", "1": "lesion"}  # the panels and the SEG name the classes
    assert torch.allclose(loaded.network(x), network(x), atol=1e-5)
    with pytest.raises(ValueError, match="not a MONAI bundle"):
        load_classifier(tmp_path)


def test_the_choice_of_preprocessing_follows_the_mode_and_the_options_given():
    """One decision for the command line and the MONAI Label app: Med-CAM's own where asked, where
    the bundle's has nothing it lacks, or where its own options are given (with the reason); errors
    where the bundle's own is asked for and cannot be."""
    from monai_medcam.loading import LoadedClassifier

    plain = LoadedClassifier(torch.nn.Identity(), 2, 1, None, "net.pt")
    assert plain.choose_preprocessing("auto", [], "HINT") == (None, " (HINT)")
    with pytest.raises(ValueError, match="net.pt is not a MONAI bundle with a preprocessing"):
        plain.choose_preprocessing("bundle", [], "HINT")
    with pytest.raises(ValueError, match="give auto, bundle or medcam, not 'Bundle'"):
        plain.choose_preprocessing("Bundle", [], "HINT")
    # a bundle whose preprocessing has a Spacingd (never built here: each answer is decided before)
    bundle = LoadedClassifier(torch.nn.Identity(), 3, 1, None, "b", unapplied=["Spacingd"], preprocessing_config=(None, "b.json"))
    assert bundle.choose_preprocessing("medcam", [], "HINT") == (None, " (HINT)")
    assert bundle.choose_preprocessing("auto", ["--size"], "HINT") == (None, " (--size given: Med-CAM's own preprocessing; HINT)")
    with pytest.raises(ValueError, match="--size and --orientation set how Med-CAM's own preprocessing prepares inputs"):
        bundle.choose_preprocessing("bundle", ["--size", "--orientation"], "HINT")


def test_skip_vacuous_leaves_no_lesion_slices_empty(tmp_path, capsys, caplog, drawn_panels):
    from monai_medcam.demo.studies import write_demo_studies

    lesions = write_demo_studies(tmp_path / "studies")["mr_series"]  # (columns, rows, slices): a lesion on 3 of 12
    out = tmp_path / "o"
    with caplog.at_level("INFO", logger="monai_medcam.engine"):
        code = main(["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input",
                     str(tmp_path / "studies" / "mr_series"), "--output", str(out), "--format", "nifti,png", "--skip-vacuous",
                     "--class-names", "no lesion,lesion", *FAST])
    assert code == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    # the panels show slices that needed evidence, each with its own decision and verdict from the summary
    (drawn,) = drawn_panels
    shown = [int(t.split(" slice ")[1].split(" ")[0]) for t in drawn["titles"]]  # numbered as summary.csv numbers them
    assert shown
    names = {"0": "no lesion", "1": "lesion"}
    assert drawn["titles"] == [f"mr_series slice {k} (0-11)\n{names[rows[k]['label']]} (prob {float(rows[k]['prob_input']):.2f})" for k in shown]
    assert all(rows[k]["slice"] == str(k) for k in shown)
    verdicts = ["verified" if rows[k]["verified"] == "True" else "NOT verified" for k in shown]
    assert [n[0].split(" (")[0] for n in drawn["notes"]["Med-CAM evidence"]] == verdicts
    assert [n[0].split("prob ")[1][:4] for n in drawn["notes"]["Med-CAM evidence"]] == [f"{float(rows[k]['prob_evidence']):.2f}" for k in shown]
    assert len(rows) == 12
    vacuous = [r for r in rows if r["vacuous"] == "True"]
    assert vacuous and len(vacuous) < 12  # the no-lesion slices, not the lesion ones
    named = ", ".join(f"mr_series slice {r['slice']}" for r in vacuous if int(r["slice"]) < 8)  # the first batch of 8
    assert f"images [{named}]: the classifier gives label" in caplog.text  # the log names inputs, not batch places
    for row in rows:
        if row["vacuous"] == "True":  # left empty without a single step
            assert (row["label"], float(row["area"]), row["steps"], row["settled"]) == ("0", 0.0, "0", "True")
        else:
            assert int(row["steps"]) > 0 and float(row["area"]) > 0
    lesion_slices = {k for k in range(12) if lesions[..., k].any()}
    assert lesion_slices <= {int(r["slice"]) for r in rows if r["vacuous"] == "False"}


def test_bad_gradcam_layer_stops_before_any_work(tmp_path, capsys):
    """A misspelt Grad-CAM layer, or one asked of a TorchScript classifier (hooks do not run there),
    is refused before anything is optimised or written: exit status 2 and a message naming it."""
    args = ["--input", str(TEST_FILES / "MR_small.dcm"), "--output", str(tmp_path / "o"), "--format", "png", *FAST]
    code = main(["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--gradcam-layer", "layr4", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Grad-CAM layer 'layr4' not found" in err and "'layer4'" in err
    network = build_radiology_network()
    network.load_state_dict(torch.load(RADIOLOGY_CHECKPOINT, weights_only=True))
    scripted = tmp_path / "model.ts"
    torch.jit.script(network.eval()).save(str(scripted))
    code = main(["explain", "--classifier", str(scripted), "--gradcam-layer", "layer4", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Grad-CAM layer 'layer4'" in err and "TorchScript" in err
    assert not (tmp_path / "o").exists()


def test_orientation_comes_from_a_bundles_preprocessing_and_the_command_line(tmp_path, capsys, monkeypatch):
    """A bundle whose preprocessing reorients volumes (``Orientationd``, here through a reference) gives
    its axis codes to ``medcam explain``; ``--orientation`` overrides them (``none``: as read), and
    bad codes in either stop before any work, naming where they came from; a bundle's codes that
    Med-CAM does not take (a 2D bundle's ``RA``) load, and ``--orientation none`` overrides them."""
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = {"axcodes": "ras", "network_def": {"_target_": "monai_medcam.demo.classifier.build_radiology_network"},
              "preprocessing": {"_target_": "Compose", "transforms": [{"_target_": "LoadImaged", "keys": "image"},
                                                                      {"_target_": "Orientationd", "keys": "image", "axcodes": "@axcodes"}]}}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    shutil.copy(RADIOLOGY_CHECKPOINT, bundle / "models" / "model.pt")
    assert load_classifier(bundle).orientation == "RAS"
    assert load_classifier(Path(__file__).parents[1] / "bundles" / "medcam_explain").orientation is None  # its "orientation": null

    import monai_medcam.pipeline

    given = {}
    monkeypatch.setattr(monai_medcam.pipeline, "explain_inputs", lambda *a, **k: given.update(k) or monai_medcam.pipeline.ExplainReport())
    args = ["explain", "--classifier", str(bundle), "--input", str(TEST_FILES / "MR_small.dcm"), "--output", str(tmp_path / "o"), *FAST]
    main(args)
    assert given["orientation"] == "RAS"
    assert "note: volumes are reoriented to RAS for the classifier, as " in capsys.readouterr().err  # where it came from
    main([*args, "--orientation", "none"])
    assert given["orientation"] == "none"  # explain_inputs reads it as "as read"
    monkeypatch.undo()
    assert main([*args, "--orientation", "RAX"]) == 2
    assert "orientation 'RAX': give three axis codes" in capsys.readouterr().err and not (tmp_path / "o").exists()
    config["axcodes"] = "RA"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "inference.json: preprocessing Orientationd 'RA': give three axis codes" in err and "--orientation overrides" in err
    monkeypatch.setattr(monai_medcam.pipeline, "explain_inputs", lambda *a, **k: given.update(k) or monai_medcam.pipeline.ExplainReport())
    given.clear()
    main([*args, "--orientation", "none"])
    assert given["orientation"] == "none"
    config["preprocessing"]["transforms"][1] = {"_target_": "Orientationd", "keys": "image", "as_closest_canonical": True}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert load_classifier(bundle).orientation == "RAS" and load_classifier(bundle).unapplied == []

    # what medcam explain does not do as the bundle does is named before any work; references and
    # expressions are followed, a loader's reader and disabled transforms are not transforms of their own
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {"inputs": {"image": {"spatial_shape": [64, 64]}}}}))
    config["spacing"] = {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0]}
    config["window"] = [{"_target_": "monai.transforms.ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
                         "b_min": 0, "b_max": 1}]
    config["preprocessing"]["transforms"] = "$" + repr([
        {"_target_": "LoadImaged", "keys": "image", "reader": {"_target_": "ITKReader"}},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "LPS"}, "@spacing",
        {"_target_": "Resized", "keys": "image", "spatial_size": [64, 64, -1]},
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "_disabled_": True},
        {"_target_": "ScaleIntensityd", "keys": "image"},
    ]).replace("'@spacing'", "@spacing") + " + @window"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    loaded = load_classifier(bundle)
    assert (loaded.orientation, loaded.unapplied) == ("LPS", ["Spacingd", "ScaleIntensityRanged"])
    main(args)
    assert "warning: the bundle's preprocessing has Spacingd; ScaleIntensityRanged, which medcam explain's own does not do" \
        in capsys.readouterr().err
    config["preprocessing"]["transforms"] = [{"_target_": "LoadImaged", "keys": "image", "reverse_indexing": False},
                                             {"_target_": "Resized", "keys": "image", "spatial_size": [32, 32]},
                                             {"_target_": "ScaleIntensityd", "keys": "image", "minv": -1}]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert load_classifier(bundle).unapplied == ["LoadImaged(reverse_indexing)", "Resized([32, 32])", "ScaleIntensityd"]


def test_a_bundles_own_preprocessing_runs_unless_medcams_is_asked_for(tmp_path, capsys):
    """A 3D bundle trained after Spacingd, an intensity window and a flip: ``medcam explain`` runs its own
    preprocessing (loader left out), says so, and the classifier sees the box (label 1); with
    ``--preprocessing medcam``, or ``--size`` (an option of Med-CAM's own), the warning names what is
    not applied and the classifier does not see it (label 0)."""
    import numpy as np

    from monai_medcam.demo.studies import write_dicom_series
    from monai_medcam.io import find_inputs, load_image
    from tests.toys import RegionClassifier

    rng = np.random.default_rng(2)
    volume = rng.uniform(0, 900, (12, 48, 64))
    volume[3:9, 8:20, 40:56] += 2600
    write_dicom_series(tmp_path / "box", volume.astype(np.uint16), "box", spacing=(2.0, 2.0, 4.0))
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = {"network_def": {"_target_": "tests.toys.RegionClassifier", "size": 32, "spatial_dims": 3, "threshold": 0.6},
              "preprocessing": {"_target_": "Compose", "transforms": [
                  {"_target_": "LoadImaged", "keys": ["image", "label"]}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
                  {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                  {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [3.0, 3.0, 3.0], "allow_missing_keys": True},
                  {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 3500, "b_min": 0, "b_max": 1, "clip": True},
                  {"_target_": "Flipd", "keys": "image", "spatial_axis": 0},  # left-right: Med-CAM's own cannot do that
                  {"_target_": "Resized", "keys": "image", "spatial_size": [32, 32, 32]}]}}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    metadata = {"network_data_format": {"inputs": {"image": {"num_channels": 1, "spatial_shape": [32, 32, 32]}}}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    net = RegionClassifier(size=32, spatial_dims=3, threshold=0.6)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    loaded = load_classifier(bundle)
    assert loaded.unapplied == ["Spacingd", "ScaleIntensityRanged", "Flipd"] and loaded.orientation == "RAS"
    preprocessing = loaded.bundle_preprocessing()
    assert preprocessing.names == ["Orientationd", "Spacingd", "ScaleIntensityRanged", "Flipd", "Resized"] and preprocessing.key == "image"
    prepared = preprocessing(load_image(find_inputs(tmp_path / "box")[0][0]))
    net.window.copy_((prepared[0] > 0.7).float())  # the classifier decides where the bundle's preprocessing puts the box
    torch.save(net.state_dict(), bundle / "models" / "model.pt")

    args = ["explain", "--classifier", str(bundle), "--input", str(tmp_path / "box"), "--format", "nifti", "--steps", "10",
            "--target-layers", "", "--no-progress", "--seed", "0"]
    assert main([*args, "--output", str(tmp_path / "own")]) == 0
    err = capsys.readouterr().err
    assert "note: inputs go through the bundle's own preprocessing (Orientationd, Spacingd, ScaleIntensityRanged, Flipd, Resized)" in err
    assert "warning" not in err and "reoriented to RAS" not in err  # the bundle's Orientationd does it
    rows = list(csv.DictReader((tmp_path / "own" / "summary.csv").open()))
    assert [row["label"] for row in rows] == ["1"]
    import nibabel

    mask = np.asarray(nibabel.load(tmp_path / "own" / "box_evidence.nii.gz").dataobj).astype(bool)  # (columns, rows, slices)
    on_box, mirrored = mask[40:56, 8:20, 3:9].sum(), mask[8:24, 28:40, 3:9].sum()  # the box, and where a second flip puts it
    assert on_box > 0.8 * 16 * 12 * 6 and mirrored == 0, f"{mask.sum()} voxels of evidence, {on_box} on the box, {mirrored} mirrored"
    for extra in (["--preprocessing", "medcam"], ["--size", "32"]):
        assert main([*args, "--output", str(tmp_path / "medcam"), *extra]) == 0
        err = capsys.readouterr().err
        assert "warning: the bundle's preprocessing has Spacingd; ScaleIntensityRanged; Flipd, which medcam explain's own does not" in err
        assert "--preprocessing bundle applies the bundle's own" in err and "note: volumes are reoriented to RAS" in err
        assert [row["label"] for row in csv.DictReader((tmp_path / "medcam" / "summary.csv").open())] == ["0"]
    assert main([*args, "--output", str(tmp_path / "x"), "--preprocessing", "bundle", "--size", "32"]) == 2
    assert "--size set how Med-CAM's own preprocessing prepares inputs" in capsys.readouterr().err
    assert main(["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(tmp_path / "box"),
                 "--output", str(tmp_path / "x"), "--preprocessing", "bundle"]) == 2
    assert "is not a MONAI bundle with a preprocessing" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # a loader whose options Med-CAM's own loader would not honour: the bundle's preprocessing is not run
    config["preprocessing"]["transforms"][0]["reader"] = {"_target_": "NibabelReader", "as_closest_canonical": True}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the preprocessing's loader has options Med-CAM's loader does not take \(LoadImaged\(reader options\)\)"):
        load_classifier(bundle).bundle_preprocessing()
    config["preprocessing"]["transforms"][0]["reader"] = "$monai.data.NibabelReader(as_closest_canonical=False)"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert load_classifier(bundle).unapplied[0] == "LoadImaged(reader options)"  # a reader built by an expression
    del config["preprocessing"]["transforms"][0]["reader"]
    config["preprocessing"]["transforms"][0].update(as_closest_canonical=True, reverse_indexing=False)  # options beside the codes
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert load_classifier(bundle).unapplied[0] == "LoadImaged(reverse_indexing)" and load_classifier(bundle).orientation == "RAS"
    del config["preprocessing"]["transforms"][0]["reverse_indexing"], config["preprocessing"]["transforms"][0]["as_closest_canonical"]
    config["preprocessing"]["transforms"].append({"_target_": "ScaleIntensityRange", "a_min": 0, "a_max": 1, "b_min": 0, "b_max": 1})
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert main([*args, "--output", str(tmp_path / "x"), "--preprocessing", "bundle"]) == 2
    assert "mixes array transforms (ScaleIntensityRange) with dictionary ones" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "mixed")]) == 0  # auto: Med-CAM's own, saying why
    assert "the bundle's own cannot run here: " in capsys.readouterr().err

def test_classifier_mismatch_stops_before_any_work(tmp_path, capsys):
    """A class index beyond the classifier's classes, or a 2D classifier run as 3D, is found by one
    forward pass before any input is read (exit status 2, no output folder), not by every batch."""
    args = ["--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(TEST_FILES / "MR_small.dcm"),
            "--output", str(tmp_path / "o"), *FAST]
    code = main(["explain", *args, "--class-idx", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--class-idx [2] out of range: the classifier has 2 classes (0..1)" in err
    code = main(["explain", *args, "--spatial-dims", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "failed on 3D inputs of shape (1, 1, 64, 64, 64)" in err and "--spatial-dims" in err
    assert not (tmp_path / "o").exists()
    assert main(["explain", *args, "--class-idx", "1", "--format", "png"]) == 0  # a class in range is explained
    rows = list(csv.DictReader((tmp_path / "o" / "summary.csv").open()))
    assert [row["label"] for row in rows] == ["1"]


def test_a_failing_grad_cam_keeps_the_evidence(tmp_path, monkeypatch, caplog):
    """Grad-CAM only adds a column to the pictures: if it fails on a batch, the evidence of that batch
    is written all the same (its panel without Grad-CAM) and the failure is logged, naming the inputs."""
    import monai_medcam.pipeline as pipeline

    def broken(*_args, **_kwargs):
        raise RuntimeError("no gradient")

    monkeypatch.setattr(pipeline, "grad_cam", broken)
    out = tmp_path / "o"
    code = main(["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input",
                 str(TEST_FILES / "MR_small.dcm"), "--output", str(out), "--format", "png,nifti",
                 "--gradcam-layer", "layer4", *FAST])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["MR_small_evidence.nii.gz", "MR_small_evidence.png", "run.json", "summary.csv"]
    assert "Grad-CAM at 'layer4' failed (RuntimeError: no gradient); panels of MR_small.dcm without it" in caplog.text

    # a volume over two batches, Grad-CAM failing on the second only: its panel has no Grad-CAM at all
    import numpy as np

    from monai_medcam.demo.studies import write_dicom_series
    from monai_medcam.visualize import grad_cam as real

    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("no gradient")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "grad_cam", second_fails)
    write_dicom_series(tmp_path / "series", np.random.default_rng(0).integers(0, 900, (3, 32, 32)).astype(np.uint16), "three")
    out = tmp_path / "o2"
    code = main(["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(tmp_path / "series"),
                 "--output", str(out), "--format", "png,nifti", "--batch-size", "2", "--gradcam-layer", "layer4", *FAST])
    assert code == 0 and len(calls) == 2
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "series_evidence.nii.gz", "series_evidence.png", "summary.csv"]


def test_output_inside_the_input_folder_and_an_unusable_output(tmp_path, capsys):
    """A second run into an output folder inside the input folder explains the same inputs (not its own
    outputs); an output path under a file stops the run before any work, with exit status 2."""
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(TEST_FILES / "MR_small.dcm", study / "mr.dcm")
    args = ["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(study),
            "--output", str(study / "evidence"), "--format", "nifti,png", *FAST]
    assert main(args) == 0 and main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("1 input(s) explained, 0 failed") == 2
    rows = list(csv.DictReader((study / "evidence" / "summary.csv").open()))
    assert [Path(r["input"]).name for r in rows] == ["mr.dcm"]
    (tmp_path / "a_file").write_text("")
    code = main(["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(study),
                 "--output", str(tmp_path / "a_file" / "out"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and f"output folder {tmp_path / 'a_file' / 'out'}: cannot write there (NotADirectoryError" in err


def test_device_steps_and_batch_size_are_checked_before_any_work(tmp_path, capsys):
    """--device naming a CUDA device the machine lacks (it was a raw torch traceback, exit 1), --steps 0
    (it silently ran the default 300 steps), --batch-size 0 (accepted): each refused, exit 2, nothing written."""
    base = ["--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(TEST_FILES / "MR_small.dcm"),
            "--output", str(tmp_path / "o"), "--no-progress"]
    assert main(["explain", *base, "--device", "cuda:99"]) == 2
    assert "error: --device cuda:99: this machine has" in capsys.readouterr().err
    assert main(["wsi", "--classifier", FACTORY, "--slide", "x.tif", "--output", str(tmp_path / "o"), "--device", "cuda:99"]) == 2
    assert "CUDA device(s); use --device cpu" in capsys.readouterr().err
    assert main(["explain", *base, "--size", "64", "--class-names", "normal,benign,malignant"]) == 2  # a two-class classifier
    assert "error: class names are given for classes [0, 1, 2], but the classifier has 2 (0-1); check --class-names" in capsys.readouterr().err
    for command, option in (("explain", "--steps"), ("explain", "--batch-size"), ("demo", "--steps")):
        arguments = base if command == "explain" else ["--output", str(tmp_path / "o")]
        with pytest.raises(SystemExit) as caught:
            main([command, *arguments, option, "0"])
        assert caught.value.code == 2 and f"{option}: must be at least 1, not 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_table_at_the_end_counts_over_the_decisions_that_needed_evidence():
    """A volume of four slices, two of them empty "no lesion" decisions (vacuous, skipped): verified
    and settled out of the two that needed evidence, the probabilities and area over those two."""
    import io
    import types

    from monai_medcam.cli import print_report

    def row(label, p, area, verified, vacuous):
        return {"input": "brain.nii.gz", "label": label, "prob_input": p, "prob_evidence": 0.9, "area": area,
                "verified": verified, "settled": True, "vacuous": vacuous}

    rows = [row(0, 0.99, 0.0, False, True), row(1, 0.8, 0.02, True, False), row(1, 0.6, 0.04, False, False), row(0, 0.95, 0.0, True, True)]
    out = io.StringIO()
    print_report(types.SimpleNamespace(rows=rows, failures={"bad.dcm": "truncated"}), out)
    header, line, failed = out.getvalue().splitlines()
    assert header.split() == ["input", "n", "label", "none", "p(label)", "p(evid.)", "area", "verified", "settled"]
    assert line.split() == ["brain.nii.gz", "4", "0,1", "2", "0.700", "0.900", "3.00%", "1/2", "2/2"]
    assert failed == "FAILED bad.dcm: truncated"
    out = io.StringIO()  # as read back from summary.csv: text
    print_report(types.SimpleNamespace(rows=[{k: str(v) for k, v in r.items()} for r in rows], failures={}), out)
    assert out.getvalue().splitlines()[1].split()[-2:] == ["1/2", "2/2"]


def test_a_file_no_decoder_reads_is_one_line_without_pydicoms_tracebacks(tmp_path, monkeypatch, caplog):
    # pydicom logs a traceback for each decoding plugin that fails; the error line names them all
    import logging

    monkeypatch.setattr(logging.getLogger("pydicom"), "level", logging.getLogger("pydicom").level)  # restored after
    source = TEST_FILES / "GDCMJ2K_TextGBR.dcm"  # JPEG 2000 that Pillow cannot decode
    args = ["explain", "--classifier", FACTORY, "--weights", str(RADIOLOGY_CHECKPOINT), "--input", str(source),
            "--output", str(tmp_path / "o"), "--format", "nifti", *FAST]
    with caplog.at_level(logging.DEBUG):
        assert main(args) == 1
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failed) == 1 and failed[0].startswith(f"{source}: cannot read the image (") and "pillow" in failed[0]
