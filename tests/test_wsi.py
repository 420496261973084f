"""Whole-slide Med-CAM: tissue detection, tile grid, stitching geometry, kill-and-resume, bad slides.

The slide is made at test time from scikit-image's IHC section (mosaicked to 2048 x 2560, four
levels) with lesions at known places; ``LesionColourClassifier`` decides from lesion pixels only.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("openslide")

from monai_medcam.demo.slides import LESION_CENTRES, write_demo_slide, write_pyramidal_tiff  # noqa: E402
from monai_medcam import MedCAM  # noqa: E402
from monai_medcam.io import InputError  # noqa: E402
from monai_medcam.settings import BY_CLASSIFIER  # noqa: E402
from monai_medcam.wsi import _check_not_another_slides, explain_slide, open_slide, tile_grid, tissue_mask  # noqa: E402
from tests.toys import LesionColourClassifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(target_layers=[], steps=40, max_retries=0, progress=False)
LEVEL, TILE = 2, 64


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("slides") / "ihc.tif"
    truth = write_demo_slide(path)
    return path, truth


@pytest.fixture(scope="module")
def explained(slide, tmp_path_factory):
    path, truth = slide
    out = tmp_path_factory.mktemp("wsi_out")
    report = explain_slide(LesionColourClassifier(), path, out, level=LEVEL, tile=TILE, batch_size=8, **{**FAST, "steps": 100})
    return report, out, truth


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_both_backends_read_the_pyramid(slide, backend):
    reader, wsi = open_slide(slide[0], backend)
    assert reader.get_level_count(wsi) == 4
    assert [tuple(reader.get_size(wsi, k)) for k in range(4)] == [(2048, 2560), (1024, 1280), (512, 640), (256, 320)]


def test_tissue_detection_keeps_tissue_and_leaves_glass(slide):
    reader, wsi = open_slide(slide[0])
    tissue, rgb, level = tissue_mask(reader, wsi)
    assert level == 3 and tissue.shape == (256, 320) and rgb.shape == (3, 256, 320)
    glass = tissue[:, int(0.8 * 320) + 1 :]
    assert glass.mean() == 0.0  # the right fifth is glass
    assert 0.3 < tissue[:, :250].mean() < 0.95  # the IHC section: stained tissue and pale gaps


def test_tile_grid_on_a_hand_made_mask():
    tissue = np.zeros((10, 12), bool)
    tissue[0:5, 0:6] = True  # the top-left quarter of a (20, 24) level at scale 0.5
    tiles = tile_grid((20, 24), 8, tissue, scale=0.5, min_tissue=0.5)
    # (0, 1): level columns 8-15 are mask columns 4-7, half of them tissue; (1, 0): mask rows 4-7, a quarter
    assert [(t.row, t.col, t.tissue) for t in tiles] == [(0, 0, 1.0), (0, 1, 0.5)]
    edge = tile_grid((20, 24), 8, np.ones((10, 12), bool), scale=0.5)
    assert len(edge) == 9 and (edge[-1].height, edge[-1].width) == (4, 8)  # edge tiles cut at the border


def test_slide_map_puts_each_tile_mask_at_its_place(explained):
    report, out, truth = explained
    assert report.explained == report.tiles and report.resumed == 0
    with tifffile.TiffFile(report.outputs["evidence"]) as tif:
        shapes = [page.shape for page in tif.pages]
        evidence = tif.pages[0].asarray()
        assert tif.pages[0].is_tiled and tif.pages[1].is_reduced
    assert shapes == [(512, 640), (256, 320), (128, 160)]
    assert set(np.unique(evidence)) <= {0, 255}
    truth = truth[::4, ::4]  # level 2
    rows = list(csv.DictReader(report.outputs["tiles"].open()))
    assert len(rows) == report.tiles
    assert all(int(r["retries"]) >= 0 and int(r["steps"]) >= 0 for r in rows)
    positive = {(int(r["row"]), int(r["col"])) for r in rows if r["label"] == "1"}
    assert positive == {(cy // 4 // TILE, cx // 4 // TILE) for cy, cx in LESION_CENTRES}
    for cy, cx in LESION_CENTRES:
        y, x = cy // 4, cx // 4
        window = (slice(y // TILE * TILE, y // TILE * TILE + TILE), slice(x // TILE * TILE, x // TILE * TILE + TILE))
        on = evidence[window] > 0
        lesion = truth[window]
        # the minimal evidence covers part of the lesion (a few of its most yellow pixels decide) at its place;
        # after 100 steps thin stray arcs remain in the tile, but a tile mask shifted by more than the
        # lesion's radius (5 pixels) would cover the lesion no more densely than the rest of the tile
        on_lesion = (on & lesion).sum() / lesion.sum()
        off_lesion = (on & ~lesion).sum() / (~lesion).sum()
        assert on_lesion > 0.2 and on_lesion > 3 * off_lesion, (float(on_lesion), float(off_lesion))
    # tiles without a lesion decide "no lesion" with no evidence needed: nothing in the slide map
    covered = np.zeros_like(truth)
    for row, col in positive:
        covered[row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE] = True
    assert not evidence[~covered].any()
    for row in rows:
        assert int(row["x0"]) == 4 * int(row["x"]) and int(row["y0"]) == 4 * int(row["y"])
    thumbnail = report.outputs["thumbnail"]
    from PIL import Image

    picture = np.asarray(Image.open(thumbnail))
    # the explained level 2 itself (640 x 512, under 2,048 px; the tissue level 3 before session 33), then the caption and key
    assert picture.shape[1] == 640 and picture.shape[0] > 512
    assert (picture[512:] == 255).mean() > 0.8  # a white strip with some text
    tint = (picture[:512, :, 0] > 220) & (picture[:512, :, 1] < 130) & (picture[:512, :, 2] < 90)  # red on the yellow lesions
    assert tint.sum() >= 0.8 * (evidence > 0).sum() and not (tint & (evidence == 0)).any()  # every evidence pixel, one to one
    # the "no lesion" tiles need no evidence (vacuous) and are left empty; random content around nothing
    # makes the classifier call "lesion", so their empty masks fail the background check (verified False),
    # but there is no evidence to verify: they are not yellow. Only a tile whose call needed evidence can be.
    empty_vacuous = [r for r in rows if r["vacuous"] == "True" and r["verified"] == "False" and float(r["area"]) == 0]
    assert len(empty_vacuous) > len(rows) // 2
    needed = [r for r in rows if r["vacuous"] == "False" and r["verified"] == "False"]
    yellow = (picture[:512, :, 0] > 200) & (picture[:512, :, 1] > 180) & (picture[:512, :, 2] < 60)
    boxes = np.zeros_like(yellow)
    for r in needed:  # level 2 -> the level-2 thumbnail: the same pixels
        x, y = int(r["x"]), int(r["y"])
        boxes[y : y + TILE, x : x + TILE] = True
    assert yellow.any() == bool(needed) and not (yellow & ~boxes).any()
    assert sorted(p.name for p in out.iterdir()) == ["ihc_evidence.tif", "ihc_thumbnail.png", "ihc_tiles.csv"]


def _cli(slide: Path, out: Path, *extra: str) -> list[str]:
    """``medcam wsi`` at level 3 with 32-pixel tiles in batches of 4 (cheap, many batches)."""
    return [
        sys.executable, "-m", "monai_medcam.cli", "wsi", "--classifier", "python:tests.toys:LesionColourClassifier",
        "--slide", str(slide), "--output", str(out), "--level", "3", "--tile", "32", "--batch-size", "4",
        "--steps", "20", "--target-layers", "", "--no-progress", *extra,
    ]


def test_classifier_mismatch_stops_before_any_tile(slide, tmp_path, capsys):
    """A class the tile classifier does not have, or tiles it cannot take, is found by one forward
    pass before the working state or any output is made (exit status 2)."""
    from monai_medcam.cli import main

    path, _ = slide
    args = _cli(path, tmp_path / "out")[3:]  # without "python -m monai_medcam.cli"
    assert main([*args, "--class-idx", "3"]) == 2
    assert "--class-idx [3] out of range: the classifier has 2 classes (0..1)" in capsys.readouterr().err
    assert main([*args, "--classifier", "python:tests.toys:fixed_size_tile_classifier"]) == 2  # 64-pixel tiles only
    err = capsys.readouterr().err
    assert "failed on 2D inputs of shape (1, 3, 32, 32)" in err and "check --tile and --size" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(600)
def test_killed_run_resumes_to_the_same_outputs(slide, tmp_path):
    path, _ = slide
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    whole = tmp_path / "whole"
    subprocess.run(_cli(path, whole), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)

    resumed = tmp_path / "resumed"
    journal = resumed / ".ihc.medcam" / "journal.jsonl"
    process = subprocess.Popen(_cli(path, resumed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    total = len((whole / "ihc_tiles.csv").read_text().splitlines()) - 1
    finished = sum(1 for line in journal.read_text().splitlines() if line.endswith("}"))  # complete journal lines
    assert 1 <= finished < -(-total // 4)  # killed mid-slide
    assert not (resumed / "ihc_evidence.tif").exists()  # no output before the slide is done

    again = subprocess.run(_cli(path, resumed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{total - 4 * finished} explained now, {4 * finished} resumed" in again.stdout  # finished tiles not redone
    assert (whole / "ihc_tiles.csv").read_text() == (resumed / "ihc_tiles.csv").read_text()
    with tifffile.TiffFile(whole / "ihc_evidence.tif") as a, tifffile.TiffFile(resumed / "ihc_evidence.tif") as b:
        assert len(a.pages) == len(b.pages)
        for page_a, page_b in zip(a.pages, b.pages):
            np.testing.assert_array_equal(page_a.asarray(), page_b.asarray())
    assert sorted(p.name for p in resumed.iterdir()) == ["ihc_evidence.tif", "ihc_run.json", "ihc_thumbnail.png", "ihc_tiles.csv"]
    record = json.loads((resumed / "ihc_run.json").read_text())  # the resumed run's record: what it did and with what
    assert record["status"] == "finished" and record["command"]["argv"][:2] == ["medcam", "wsi"]
    assert record["outcome"]["tiles"] == total and record["outcome"]["resumed"] == 4 * finished
    assert record["settings"]["given"] == {"steps": 20, "skip_vacuous": True}  # medcam wsi skips vacuous tiles unless told
    assert record["classifier"] == {"source": "python:tests.toys:LesionColourClassifier", "files": []} and record["target_layers"] == []


def _no_files(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def _index_after_pixels(path: Path, image: np.ndarray, levels: int = 3, tile: int = 256) -> Path:
    """A tiled RGB pyramid laid out as libtiff writes it: each page's tiles, then its index (IFD)."""
    import struct

    out, pointer = bytearray(b"II*\x00\x00\x00\x00\x00"), 4
    for k in range(levels):
        height, width, _ = image.shape
        offsets, counts = [], []
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                block = np.zeros((tile, tile, 3), np.uint8)
                part = image[y : y + tile, x : x + tile]
                block[: part.shape[0], : part.shape[1]] = part
                offsets.append(len(out))
                counts.append(block.nbytes)
                out += block.tobytes()
        bits = len(out)
        out += struct.pack("<3H", 8, 8, 8)
        at_offsets = len(out)
        out += struct.pack(f"<{len(offsets)}I", *offsets)
        at_counts = len(out)
        out += struct.pack(f"<{len(counts)}I", *counts)
        struct.pack_into("<I", out, pointer, len(out))  # the previous page's "next page"
        many = len(offsets) > 1
        tags = [(254, 4, 1, 1 if k else 0), (256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bits), (259, 3, 1, 1),
                (262, 3, 1, 2), (277, 3, 1, 3), (284, 3, 1, 1), (322, 3, 1, tile), (323, 3, 1, tile),
                (324, 4, len(offsets), at_offsets if many else offsets[0]), (325, 4, len(counts), at_counts if many else counts[0])]
        out += struct.pack("<H", len(tags))
        for tag, kind, count, value in tags:
            out += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1 else struct.pack("<HHII", tag, kind, count, value)
        pointer = len(out)
        out += b"\x00\x00\x00\x00"
        image = image[::2, ::2].copy()
    path.write_bytes(bytes(out))
    return path


def test_bad_slides_are_refused_with_nothing_written(slide, tmp_path):
    path, _ = slide
    net = LesionColourClassifier()
    text = tmp_path / "notes.tif"
    text.write_text("not a slide")
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    glass = tmp_path / "glass.tif"
    write_pyramidal_tiff(np.full((1024, 1024, 3), 242, np.uint8), glass, levels=3)
    cut = tmp_path / "cut.tif"  # a copy cut short: tifffile would read it as a slide of fewer levels
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 10])
    # libtiff's and vips's layout (each page's pixels, then its index), cut in the last page: every page
    # tifffile finds is whole, but the second points to a third past the end
    whole = _index_after_pixels(tmp_path / "libtiff.tif", np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8))
    assert open_slide(whole, "tifffile")[0].get_level_count(open_slide(whole, "tifffile")[1]) == 3
    cut_index_last = tmp_path / "libtiff_cut.tif"
    cut_index_last.write_bytes(whole.read_bytes()[: whole.stat().st_size * 97 // 100])
    cases = [
        (tmp_path / "absent.tif", {}, "no such slide"),
        (text, {}, "cannot read the slide"),
        (flat, {}, "not a pyramidal slide"),
        (path, {"level": 9}, "level 9 is out of range: the slide has levels 0 to 3"),
        (path, {"level": 3, "tile": 512}, "tile 512 is larger than level 3"),
        (glass, {"level": 1, "tile": 64}, "no tissue found"),
        (cut, {}, r"the file is truncated \(page 0's pixels end at byte \d+ of \d+\): an incomplete copy"),
        (cut_index_last, {}, r"the file is truncated \(page 2 would begin at byte \d+, past its end \(\d+\)\)"),
    ]
    for k, (source, options, message) in enumerate(cases):
        out = tmp_path / f"out{k}"
        arguments = {"level": LEVEL, "tile": TILE, **options}
        with pytest.raises(InputError, match=message) as caught:
            explain_slide(net, source, out, **arguments, **FAST)
        assert caught.value.path == source
        assert _no_files(out), source
    unflagged = tmp_path / "unflagged.tif"  # levels as tiled pages, but not marked reduced-resolution
    with tifffile.TiffWriter(unflagged) as tif:
        for side in (512, 256, 128):
            tif.write(np.full((side, side, 3), 180, np.uint8), tile=(64, 64), photometric="rgb")
    for backend in ("openslide", "tifffile"):  # tifffile used to count the pages, then fail reading level 1
        with pytest.raises(InputError, match=f"not a pyramidal slide: {backend} finds 1 level.*subfiletype=1"):
            open_slide(unflagged, backend)
    extra = tmp_path / "extra.tif"  # a two-level pyramid and a label page: MONAI's tifffile reader counts 3 levels
    with tifffile.TiffWriter(extra) as tif:
        tif.write(np.full((512, 512, 3), 180, np.uint8), tile=(64, 64), photometric="rgb", subfiletype=0)
        tif.write(np.full((256, 256, 3), 180, np.uint8), tile=(64, 64), photometric="rgb", subfiletype=1)
        tif.write(np.full((64, 64, 3), 10, np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="tifffile reader cannot read this layout: 3 pages but a pyramid of 2 levels"):
        open_slide(extra, "tifffile")
    reader, wsi = open_slide(extra, "openslide")
    assert reader.get_level_count(wsi) == 2
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="the output .*afile is a file, not a folder"):
        explain_slide(net, path, afile, level=LEVEL, tile=TILE, **FAST)
    assert afile.read_text() == "x"
    out = tmp_path / "bad_setting"  # a misspelt setting fails before the working state is made
    with pytest.raises(TypeError, match=r"unknown MedCAM setting\(s\) \['stepz'\]"):
        explain_slide(net, path, out, level=LEVEL, tile=TILE, stepz=40)
    assert _no_files(out)


def test_state_of_a_different_run_is_refused_unless_restarted(slide, tmp_path, caplog):
    path, _ = slide
    state = tmp_path / ".ihc.medcam"
    state.mkdir()
    (state / "run.json").write_text("{}")
    with pytest.raises(InputError, match="different run"):
        explain_slide(LesionColourClassifier(), path, tmp_path, level=3, tile=64, **FAST)
    with pytest.raises(InputError, match="different run"):  # the word a bundle's command line passes
        explain_slide(LesionColourClassifier(), path, tmp_path, level=3, tile=64, restart="false", **FAST)
    with caplog.at_level("INFO"):
        report = explain_slide(LesionColourClassifier(), path, tmp_path, level=3, tile=64, restart=True, **FAST)
    assert report.outputs["evidence"].is_file() and not state.exists()
    # the explainer's notes per batch (vacuous tiles, ...) give way to one summary from the tiles' rows
    assert not [r for r in caplog.records if r.name == "monai_medcam.engine" and r.levelno < logging.WARNING]
    rows = list(csv.DictReader(report.outputs["tiles"].open()))
    vacuous = sum(r["vacuous"] == "True" for r in rows)
    assert 0 < vacuous < len(rows)
    assert f"ihc.tif: {len(rows)} tiles explained: {vacuous} need no evidence (vacuous)" in caplog.text
    assert logging.getLogger("monai_medcam.engine").level == logging.NOTSET and not logging.getLogger("monai_medcam.engine").filters
    caplog.clear()
    with caplog.at_level("INFO", logger="monai_medcam.engine"):  # the caller asked for the engine's notes: kept
        explain_slide(LesionColourClassifier(), path, tmp_path / "again", level=3, tile=64, **FAST)
    assert [r for r in caplog.records if r.name == "monai_medcam.engine" and "vacuous" in r.getMessage()]


def test_what_differs_from_an_earlier_run_is_named():
    from monai_medcam.wsi import _differences

    before = {"level": 2, "settings": {"steps": 150, "old": 1}, "target_layers": ["features.denseblock4.denselayer16.conv1"]}
    now = {"level": 2, "settings": {"steps": 100, "new": 2.0}, "target_layers": ["features.denseblock4.denselayer16.conv2"]}
    assert _differences(before, now) == [
        "settings.new: (absent) -> 2.0", "settings.old: 1 -> (absent)", "settings.steps: 150 -> 100",
        'target_layers[0]: "features.dens...ck4.denselayer16.conv1" -> "features.dens...ck4.denselayer16.conv2"',
    ]


def test_a_damaged_state_is_refused_unless_restarted(slide, tmp_path, monkeypatch):
    """A torn run.json (a power cut as it was written) or a state whose mask is gone is not resumed:
    refused with the folder named (not a JSON traceback), discarded with restart=True; the state of a
    finished run is renamed before it is removed, so a removal cut short leaves nothing to resume. A
    second run on the same outputs is refused while the first holds them; the next run removes the
    temporary files of one killed while writing its outputs. A copy of the slide elsewhere resumes
    the state of the original (a state is the slide's by its size and the hash of its ends)."""
    import monai_medcam.wsi

    path, _ = slide
    state, half_removed = tmp_path / ".ihc.medcam", tmp_path / ".ihc.medcam.removed"
    removed = []
    monkeypatch.setattr(monai_medcam.wsi, "_remove_state", removed.append)  # the finished run's state kept
    first = explain_slide(LesionColourClassifier(), path, tmp_path, level=3, tile=64, **FAST)
    assert removed == [state] and (state / "mask.npy").is_file()
    for written in first.outputs.values():  # as if killed before its final writes
        written.unlink()
    copy = tmp_path / "scratch" / path.name  # the same slide copied elsewhere (a job's node-local scratch), newer
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    again = explain_slide(LesionColourClassifier(), copy, tmp_path, level=3, tile=64, **FAST)
    assert (again.resumed, again.explained) == (first.tiles, 0)  # the copy's state: every tile already done
    for written in again.outputs.values():
        written.unlink()
    monkeypatch.undo()
    run = (state / "run.json").read_text()
    for damage in ("torn run.json", "no mask"):
        if damage == "torn run.json":
            (state / "run.json").write_text(run[: len(run) // 2])
        else:
            (state / "run.json").write_text(run)
            (state / "mask.npy").unlink()
        with pytest.raises(InputError, match=r"\.ihc\.medcam holds the state of a different run .* or a damaged one"):
            explain_slide(LesionColourClassifier(), path, tmp_path, level=3, tile=64, **FAST)
    half_removed.mkdir()  # and what a removal killed part way left
    torn = tmp_path / ".tmp-4242-ihc_evidence.tif"  # and a run killed while writing its outputs
    torn.write_bytes(b"II*\x00")
    others = tmp_path / ".tmp-4243-case-ihc_tiles.csv"  # another slide's ("case-ihc"), being written now
    others.write_text("tile\n")
    fcntl = pytest.importorskip("fcntl")
    with (tmp_path / ".ihc.medcam.lock").open("a") as held:  # another run, writing these outputs now
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="another run is writing this slide's outputs"):
            explain_slide(LesionColourClassifier(), path, tmp_path, level=3, tile=64, restart=True, **FAST)
        assert torn.exists() and half_removed.exists()  # nothing of the other run's touched

    def no_flock(handle, how):  # a file system without locks (Lustre mounted noflock): run, with a warning
        raise OSError(errno.ENOSYS, "Function not implemented")

    with monkeypatch.context() as patched:
        patched.setattr(fcntl, "flock", no_flock)
        report = explain_slide(LesionColourClassifier(), path, tmp_path, level=3, tile=64, restart=True, **FAST)
    assert report.explained == report.tiles and not state.exists() and not half_removed.exists()
    assert torn.exists()  # unlocked, a run cannot know whether another is writing it
    explain_slide(LesionColourClassifier(), path, tmp_path, level=3, tile=64, restart=True, **FAST)
    assert not torn.exists() and others.exists()  # this slide's left by a killed run removed, another slide's not
    others.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ihc_evidence.tif", "ihc_thumbnail.png", "ihc_tiles.csv", "scratch"]


def test_a_run_that_locks_a_lock_file_just_removed_tries_again(tmp_path, monkeypatch):
    """A run that opened the lock file just before the run holding it finished (and removed it)
    would lock a file no longer there, beside a third run locking the new one: it tries again on the
    file at the path. Without fcntl (Windows) no lock file is made."""
    fcntl = pytest.importorskip("fcntl")
    from monai_medcam.wsi import _only_run

    lock, real, calls = tmp_path / ".s.medcam.lock", fcntl.flock, []

    def flock(handle, how):
        calls.append(how)
        if len(calls) == 1:
            lock.unlink()  # the run before finishes between this run's open and its lock
        return real(handle, how)

    monkeypatch.setattr(fcntl, "flock", flock)
    with _only_run(tmp_path, "s", tmp_path / "s.tif"):
        assert len(calls) == 2 and lock.exists()
        with lock.open("a") as third, pytest.raises(OSError):
            real(third, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the file at the path is the one held
    assert not lock.exists()
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl raises ImportError, as on Windows
    with _only_run(tmp_path, "s", tmp_path / "s.tif"):
        assert not lock.exists()


def test_transparent_openslide_areas_take_the_slide_background(slide):
    """Unscanned areas (transparent in openslide's RGBA) reach the classifier and the thumbnail in the
    slide's background colour, not black; the resolution of a level without its own comes from level 0."""
    from types import SimpleNamespace

    from PIL import Image

    from monai_medcam.wsi import _level_mpp, _read_region

    class Slide:
        properties = {"openslide.background-color": "F0E0D0"}

        def read_region(self, location, level, size):
            region = Image.new("RGBA", size, (120, 60, 90, 255))
            region.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))  # the left half not scanned
            return region

    reader = SimpleNamespace(backend="openslide", get_downsample_ratio=lambda wsi, level: 4.0)
    rgb = _read_region(reader, Slide(), 2, 0, 0, 8, 10)
    assert rgb.shape == (3, 8, 10) and rgb.dtype == np.uint8
    assert (rgb[:, :, :5] == np.array([240, 224, 208])[:, None, None]).all() and (rgb[:, :, 5:] == np.array([120, 60, 90])[:, None, None]).all()
    Slide.properties = {}
    assert (_read_region(reader, Slide(), 2, 0, 0, 8, 10)[:, :, :5] == 255).all()  # no background colour given: white

    def mpp(per_level):
        def get_mpp(wsi, level):
            if per_level[level] is None:
                raise ValueError("no resolution")
            return per_level[level]
        return SimpleNamespace(get_mpp=get_mpp)

    assert _level_mpp(mpp({2: (1.0, 1.0), 0: (0.25, 0.25)}), None, 2, 4.0) == [1.0, 1.0]
    assert _level_mpp(mpp({2: None, 0: (0.25, 0.5)}), None, 2, 4.0) == [1.0, 2.0]  # level 0's, times the downsample
    assert _level_mpp(mpp({2: (0.0, 0.0), 0: None}), None, 2, 4.0) is None  # zero: no resolution (not a division by it)
    path, _ = slide
    reader, wsi = open_slide(path, "openslide")
    assert _level_mpp(reader, wsi, 2, 4.0) == pytest.approx([2.0, 2.0])  # the demo slide: 0.5 um at level 0


def test_a_run_resumed_after_a_default_changed_is_a_different_run(slide, tmp_path, monkeypatch):
    # the state records the settings as resolved, defaults included (not only those passed), so
    # tiles explained under one default are never stitched with tiles explained under another
    path, _ = slide
    explain, calls = MedCAM.explain, []

    def stops_at_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return explain(self, *args, **kwargs)

    monkeypatch.setattr(MedCAM, "explain", stops_at_the_second_batch)
    run = dict(level=3, tile=64, batch_size=1, **FAST)
    with pytest.raises(RuntimeError, match="stopped"):
        explain_slide(LesionColourClassifier(), path, tmp_path, **run)
    recorded = json.loads((tmp_path / ".ihc.medcam" / "run.json").read_text())["settings"]
    assert (recorded["act_weight"], recorded["area_weight"], recorded["steps"], recorded["skip_vacuous"]) == (10.0, 20.0, 40, True)
    assert "progress" not in recorded  # a progress bar changes no mask
    monkeypatch.setitem(BY_CLASSIFIER, "act_weight", {False: 11.0, True: 40.0})
    with pytest.raises(InputError, match=r"different run \(settings\.act_weight: 10\.0 -> 11\.0\): the earlier arguments, slide "
                                         r"and classifier, under the same version of monai_medcam, resume it; or restart \(--restart"):
        explain_slide(LesionColourClassifier(), path, tmp_path, **run)
    monkeypatch.setitem(BY_CLASSIFIER, "act_weight", {False: 10.0, True: 40.0})
    report = explain_slide(LesionColourClassifier(), path, tmp_path, **run)
    assert report.resumed == 1 and report.explained == report.tiles - 1


def test_a_full_disk_is_an_error_before_any_tile_not_a_crash(slide, tmp_path, monkeypatch, capsys):
    """A memmap's file is sparse: a page first written on a full disk kills the run with SIGBUS, with
    no message. The slide map's blocks are reserved and the space checked before any tile."""
    from monai_medcam import cli, wsi

    path, _ = slide
    shape = (1000, 3000)
    sparse = tmp_path / "sparse.npy"  # what open_memmap alone gives: no blocks behind the pages
    np.lib.format.open_memmap(sparse, mode="w+", dtype=np.uint8, shape=shape).flush()
    assert os.stat(sparse).st_blocks * 512 < 3_000_000 // 2
    state = wsi._working_state(tmp_path / ".ihc.medcam", {"run": 1}, shape, path, restart=False)
    held = os.stat(state / "mask.npy")
    assert held.st_size > 3_000_000 and held.st_blocks * 512 >= held.st_size  # every block on disk
    assert wsi._pyramid_bytes((1000, 3000)) == 500 * 1500 + 250 * 750 + 125 * 375 + 63 * 188  # down to one 256 tile
    assert wsi._pyramid_bytes((256, 200)) == 0

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    with monkeypatch.context() as patch:  # a file system that cannot allocate (some NFS, ZFS, FUSE mounts): left sparse
        patch.setattr(os, "posix_fallocate", unsupported)
        sparse_state = wsi._working_state(tmp_path / ".old.medcam", {"run": 1}, shape, path, restart=False)
    assert os.stat(sparse_state / "mask.npy").st_blocks * 512 < 3_000_000 // 2
    (sparse_state / "pyramid_1.npy").write_bytes(b"\0" * 1000)  # a run killed while writing its pyramid
    pyramid = wsi._pyramid_bytes(shape)
    little = shutil.disk_usage(tmp_path)._replace(free=pyramid + 10**6)
    with monkeypatch.context() as patch:  # resumed: the map's missing blocks count too, not the pyramid alone
        patch.setattr(shutil, "disk_usage", lambda where: little)
        with pytest.raises(OSError, match=r"\(4\.0 MB needed, 2\.0 MB free\)"):
            wsi._working_state(sparse_state, {"run": 1}, shape, path, restart=False)
    wsi._working_state(sparse_state, {"run": 1}, shape, path, restart=False)
    held = os.stat(sparse_state / "mask.npy")
    assert held.st_blocks * 512 >= held.st_size and not (sparse_state / "pyramid_1.npy").exists()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    monkeypatch.setattr(os, "posix_fallocate", full)  # space checked free, then taken by another job
    with pytest.raises(OSError, match=rf"not enough disk space in {out} for the slide map of {path} \(0\.3 MB, [\d.]+ GB free\)") as caught:
        explain_slide(LesionColourClassifier(), path, out, level=LEVEL, tile=TILE, **FAST)
    assert caught.value.errno == errno.ENOSPC and _no_files(out)  # no half-made state to resume
    monkeypatch.undo()
    nearly_full = shutil.disk_usage(tmp_path)._replace(free=50_000)
    monkeypatch.setattr(shutil, "disk_usage", lambda where: nearly_full)
    assert cli.main(_cli(path, out)[3:]) == 1  # medcam wsi at level 3: 320 x 256 pixels and one level below
    message = capsys.readouterr().err
    assert message.startswith(f"error: [Errno 28] not enough disk space in {out} for the slide map and evidence pyramid "
                              f"of {path} (0.1 MB needed, 50.0 kB free); free some space or give another output folder"), message
    assert _no_files(out)


def test_cli_interrupted_says_the_same_command_resumes_and_refuses_size_0(slide, tmp_path, monkeypatch, capsys):
    import monai_medcam.wsi
    from monai_medcam import cli

    path, _ = slide

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(monai_medcam.wsi, "explain_slide", interrupted)
    assert cli.main(_cli(path, tmp_path / "out")[3:]) == 130
    assert "the slide's finished batches are saved: the same command again resumes where it stopped" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:  # --size 0 was taken as "the tile's size"
        cli.main(_cli(path, tmp_path / "out", "--size", "0")[3:])
    assert stopped.value.code == 2 and "--size: must be at least 1, not 0" in capsys.readouterr().err


def test_cli_reports_a_bad_slide_and_exits_1(tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"\x00" * 100)
    done = subprocess.run(_cli(bad, tmp_path / "out"), cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1
    assert str(bad) in done.stderr and "cannot read the slide" in done.stderr


def test_cli_refuses_class_names_the_classifier_lacks_before_any_work(slide, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(_cli(slide[0], out, "--class-names", "normal,benign,malignant"), cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2 and "class names are given for classes [0, 1, 2], but the classifier has 2" in done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_torn_journal_line_is_cut_before_new_entries(tmp_path):
    from monai_medcam.wsi import _read_journal

    journal = tmp_path / "journal.jsonl"
    journal.write_text('{"batch": 0, "rows": []}\n{"batch": 1, "rows": []}\n{"batch": 2, "ro')  # killed mid-write
    assert sorted(_read_journal(journal)) == [0, 1]
    assert journal.read_text() == '{"batch": 0, "rows": []}\n{"batch": 1, "rows": []}\n'
    with journal.open("a") as handle:
        handle.write('{"batch": 2, "rows": []}\n')
    assert sorted(_read_journal(journal)) == [0, 1, 2]  # the next entry is not glued to the fragment


def test_a_changed_classifier_is_a_different_run():
    from monai_medcam.wsi import _fingerprint

    net = LesionColourClassifier()
    before = _fingerprint(net)
    assert _fingerprint(LesionColourClassifier()) == before
    with torch.no_grad():
        net.colour.bias.add_(1e-6)  # the last parameter, a tiny change
    assert _fingerprint(net) != before


def test_output_names_keep_dots_inside_slide_names():
    from monai_medcam.wsi import _slide_name

    assert _slide_name(Path("case.1.svs")) == "case.1" and _slide_name(Path("b.ome.tif")) == "b"


def _fragments() -> np.ndarray:
    """A biopsy-like slide ``(2048, 2560, 3)``: three small fragments of the IHC section on glass."""
    from skimage import data

    image = np.full((2048, 2560, 3), 242, np.uint8)
    section = data.immunohistochemistry()
    for y, x in ((300, 400), (1200, 900), (700, 2000)):
        image[y : y + 160, x : x + 200] = section[:160, :200]
    return image


def test_a_deep_pyramid_finds_the_tissue_of_a_shallow_one(tmp_path):
    """Pyramids often go down to one tile: the tissue mask comes from the lowest level on which a
    tile still spans 8 pixels, so a 7-level pyramid finds the same tissue tiles as a 4-level one
    (from its 40 x 32 px lowest level, half of the fragments' tiles were lost)."""
    from monai_medcam.wsi import tissue_level

    image = _fragments()
    grids = {}
    for levels in (4, 7):
        path = write_pyramidal_tiff(image, tmp_path / f"biopsy_{levels}.tif", levels)
        reader, wsi = open_slide(path)
        low = tissue_level(reader, wsi, 0, 64)
        assert low == 3  # 64 px at level 0 are 8 px at level 3 (downsample 8)
        tissue, _, _ = tissue_mask(reader, wsi, low)
        grids[levels] = [(t.row, t.col) for t in tile_grid((2048, 2560), 64, tissue, 1 / 8)]
    assert grids[7] == grids[4] and len(grids[4]) >= 3 * 12  # each 160 x 200 fragment covers at least 12 tiles
    lowest, _, _ = tissue_mask(reader, wsi)  # level 6, as before
    assert len(tile_grid((2048, 2560), 64, lowest, 1 / 64)) < len(grids[7]) * 0.6


def test_sixteen_bit_and_grey_slides(tmp_path):
    """A 16-bit RGB pyramid read by tifffile gives the 8-bit slide's pixels (MONAI's reader cast them
    to uint8, wrapping 38399 to 255); a grey slide tifffile cannot give as RGB is refused with the
    slide named (it was an exit 2 'classifier' error), and through openslide it has no colour to
    find tissue by, which the refusal says."""
    import tifffile as tf
    from skimage.transform import downscale_local_mean

    from monai_medcam.wsi import _read_region

    image = _fragments()
    eight = write_pyramidal_tiff(image, tmp_path / "eight.tif", 3)
    sixteen = tmp_path / "sixteen.tif"
    with tf.TiffWriter(sixteen) as tif:
        current = image.astype(np.uint16) * 257
        for k in range(3):
            tif.write(current, tile=(256, 256), photometric="rgb", subfiletype=1 if k else 0, metadata=None)
            current = downscale_local_mean(current, (2, 2, 1)).round().astype(np.uint16)
    a, b = open_slide(eight, "tifffile"), open_slide(sixteen, "tifffile")
    region8, region16 = _read_region(*a, 1, 150, 200, 200, 300), _read_region(*b, 1, 150, 200, 200, 300)
    assert region16.dtype == np.uint8 and np.abs(region16.astype(int) - region8).max() <= 1 and region8.max() > 200
    grey = tmp_path / "grey.tif"
    with tf.TiffWriter(grey) as tif:
        current = image.mean(-1).astype(np.uint8)
        for k in range(3):
            tif.write(current, tile=(256, 256), photometric="minisblack", subfiletype=1 if k else 0, metadata=None)
            current = current[::2, ::2]
    with pytest.raises(InputError, match="cannot read the slide's pixels with tifffile") as caught:
        explain_slide(LesionColourClassifier(), grey, tmp_path / "out_t", level=1, tile=64, backend="tifffile", **FAST)
    assert caught.value.path == grey and _no_files(tmp_path / "out_t")
    with pytest.raises(InputError, match="no tissue found .*a grey or fluorescence slide has no colour"):
        explain_slide(LesionColourClassifier(), grey, tmp_path / "out_o", level=1, tile=64, backend="openslide", **FAST)


def test_another_slide_of_the_same_name_is_not_written_over(explained, tmp_path):
    """``a/case.tif`` and then ``b/case.tif`` into one output folder: the second is refused before any
    work (it silently replaced the first one's outputs); the same slide again is not."""
    import shutil

    report, out, _ = explained
    folder = tmp_path / "out"
    shutil.copytree(out, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = tmp_path / "b" / report.slide.name
    other.parent.mkdir()
    shutil.copy(report.slide, other)
    with pytest.raises(InputError, match=f"holds the evidence of another slide of the same name, {report.slide.resolve()}"):
        explain_slide(LesionColourClassifier(), other, folder, level=LEVEL, tile=TILE, **FAST)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    evidence = folder / f"{report.slide.stem}_evidence.tif"
    assert str(report.slide.resolve()) in tifffile.TiffFile(evidence).pages[0].description
    _check_not_another_slides(report.slide, evidence)  # the same slide again: its outputs are replaced
    relative = Path(os.path.relpath(report.slide, Path.cwd()))
    _check_not_another_slides(relative, evidence)


def test_a_slide_whose_path_is_not_ascii(slide, tmp_path):
    """The evidence TIFF records its slide's path in UTF-8 (TIFF's ASCII strings took no 'ü': every
    run failed at its very end, after all its tiles, and every resume again)."""
    import shutil

    path = tmp_path / "Müller ü" / "case.tif"
    path.parent.mkdir()
    shutil.copy(slide[0], path)
    report = explain_slide(LesionColourClassifier(), path, tmp_path / "out", level=3, tile=64, **FAST)
    description = tifffile.TiffFile(report.outputs["evidence"]).pages[0].description
    assert description.endswith(str(path.resolve())) and "ü" in description
    _check_not_another_slides(path, report.outputs["evidence"])


class _Pyramid:
    """A reader's level sizes and downsamples, for :func:`tissue_level` without a file."""

    def __init__(self, ratios: list[float], size: tuple[int, int]) -> None:
        self.ratios, self.size = ratios, size

    def get_level_count(self, wsi) -> int:
        return len(self.ratios)

    def get_downsample_ratio(self, wsi, level: int) -> float:
        return self.ratios[level]

    def get_size(self, wsi, level: int) -> tuple[int, int]:
        return tuple(int(v / self.ratios[level]) for v in self.size)


def test_the_thumbnail_comes_from_the_finest_level_that_fits():
    from monai_medcam.wsi import thumbnail_level

    class Reader:  # a 40x slide's pyramid: (height, width) per level
        sizes = [(80000, 100000), (20000, 25000), (5000, 6250), (1250, 1562), (312, 390)]

        def get_size(self, wsi, level):
            return self.sizes[level]

    assert thumbnail_level(Reader(), None, 1, 4) == 3  # explained at level 1, tissue from level 4: level 3 fits
    assert thumbnail_level(Reader(), None, 1, 3) == 3  # none finer fits: the tissue level (shrunk where it must be)
    assert thumbnail_level(Reader(), None, 3, 4) == 3  # the explained level itself where it fits
    assert thumbnail_level(Reader(), None, 0, 2) == 2


def test_tissue_level_choices():
    from monai_medcam.wsi import tissue_level

    assert tissue_level(_Pyramid([1, 2, 4, 8, 16, 32, 64], (2048, 2560)), None, 0, 64) == 3  # 8 px per tile
    assert tissue_level(_Pyramid([1, 2, 4, 8], (2048, 2560)), None, 3, 64) == 3  # the explained level is the lowest
    assert tissue_level(_Pyramid([1, 32], (100_000, 80_000)), None, 0, 224) == 1  # none spans 8 px: the next level, not level 0
    # 100,000 x 80,000 px, tiles of 224: level 2 (downsample 16) would do, at 31 million pixels; more than 2**26 is not read whole
    assert tissue_level(_Pyramid([1, 4, 16, 64], (100_000, 80_000)), None, 0, 224) == 2
    assert tissue_level(_Pyramid([1, 2, 4, 64], (100_000, 80_000)), None, 0, 224) == 3


def test_bad_batch_size_and_tissue_fraction_are_refused_before_any_work(slide, tmp_path):
    for options, message in (({"batch_size": 0}, "batch_size must be a whole number of at least 1, not 0"),
                             ({"batch_size": -1}, "not -1"), ({"min_tissue": 1.5}, "min_tissue is a fraction")):
        with pytest.raises(ValueError, match=message):
            explain_slide(LesionColourClassifier(), slide[0], tmp_path / "out", level=LEVEL, tile=TILE, **{**FAST, **options})
        assert _no_files(tmp_path / "out")


def test_auto_backend_falls_back_to_tifffile_for_unmarked_levels(tmp_path):
    """Levels as tiled pages not marked reduced-resolution: openslide sees one level, tifffile the
    pyramid; ``--backend auto`` used to stop at openslide's refusal."""
    import tifffile as tf

    path = tmp_path / "unmarked.tif"
    with tf.TiffWriter(path) as tif:
        current = _fragments()
        for _ in range(3):
            tif.write(current, tile=(256, 256), photometric="rgb", metadata=None)
            current = current[::2, ::2]
    with pytest.raises(InputError, match="openslide finds 1 level"):
        open_slide(path, "openslide")
    reader, wsi = open_slide(path)
    assert reader.backend == "tifffile" and reader.get_level_count(wsi) == 3


def test_the_thumbnail_of_a_large_tissue_level_is_shrunk(tmp_path):
    """A 5000 x 3000 tissue level gives a thumbnail of at most 2048 px, the evidence and the tile
    outlines where they lie on the level (scaled with it)."""
    from PIL import Image

    from monai_medcam.wsi import SlideTile, _thumbnail

    rgb = np.full((3, 3000, 5000), 240, np.uint8)
    mask = np.zeros((6000, 10000), np.uint8)  # the explained level: twice the tissue level's side
    mask[2000:2400, 4000:4400] = 255
    tiles = [SlideTile(0, 5, 10, 2000, 4000, 400, 400, 1.0)]
    path = _thumbnail(rgb, mask, 0.5, tmp_path / "thumb.png", tiles, 400)
    picture = np.asarray(Image.open(path))
    assert picture.shape[1] == 1666 and picture.shape[0] > 1000  # 5000 / 3 (shrunk by 3), 3000 / 3; the key below
    picture = picture[:1000]
    exact = (2000 / 6, 2400 / 6, 4000 / 6, 4400 / 6)  # the level's rows 2000-2399 and columns 4000-4399, shrunk by 6
    for colour in ((picture[..., 0] > 200) & (picture[..., 1] < 150),  # the evidence, tinted red
                   (picture[..., 2] > 150) & (picture[..., 0] < 100)):  # the tile's outline, blue
        ys, xs = np.nonzero(colour)
        assert np.allclose((ys.min(), ys.max() + 1, xs.min(), xs.max() + 1), exact, atol=1.0)


def test_tiles_whose_evidence_is_not_verified_are_the_thumbnails_yellow_ones(slide, tmp_path, monkeypatch):
    """Explaining "lesion" on every tile (class_idx 1): the tiles without a lesion cannot keep it, so
    their evidence is not verified; exactly those go to the thumbnail as the yellow ones."""
    import monai_medcam.wsi

    drawn, real = {}, monai_medcam.wsi._thumbnail

    def spy(*args, **kwargs):
        drawn.update(unverified=args[6], caption=kwargs["caption"])
        return real(*args, **kwargs)

    monkeypatch.setattr(monai_medcam.wsi, "_thumbnail", spy)
    report = explain_slide(LesionColourClassifier(), slide[0], tmp_path, level=3, tile=32, batch_size=16, class_idx=1,
                           **{**FAST, "steps": 10})
    rows = list(csv.DictReader(report.outputs["tiles"].open()))
    unverified = {int(r["tile"]) for r in rows if r["verified"] == "False"}
    assert unverified and len(unverified) < len(rows)  # the lesion tiles keep "lesion"
    assert drawn["unverified"] == unverified
    assert drawn["caption"] == f"level 3, 32 px tiles; {len(rows)} tissue tiles, class 1 explained on each"


def test_partial_edge_tiles_are_stitched_in_place_and_outlined(tmp_path, monkeypatch):
    """A level whose sides are not whole numbers of tiles (1026 x 1541 px, 64 px tiles): the edge
    tiles, down to a row two pixels high, are padded for the classifier and cut back into their
    place in the slide map, and the thumbnail outlines them (a tile thinner than a thumbnail pixel
    once crashed the run at its end, and every resume with it). A stand-in explainer marks the
    slide's pure red pixels, so the slide map must be exactly the slide's red."""
    import types

    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, (1026, 1541, 3), dtype=np.uint8)
    image[1016:1026, 200:260] = (255, 0, 0)  # in the last full row of tiles and the 2 px row
    image[300:340, 1500:1541] = (255, 0, 0)  # in the last full column of tiles and the 5 px column
    path = write_pyramidal_tiff(image, tmp_path / "odd.tif", levels=3)
    red = (image[..., 0] == 255) & (image[..., 1] == 0) & (image[..., 2] == 0)

    def explain(self, x, class_idx=None, names=None):
        marks = ((x[:, 0] > 0.98) & (x[:, 1] < 0.02) & (x[:, 2] < 0.02))[:, None].float()
        rows = [dict(label=1, prob_input=0.9, prob_evidence=0.9, prob_background=0.9, area=float(m.mean()), verified=True,
                     settled=True, vacuous=False, steps=1, retries=0) for m in marks]
        return types.SimpleNamespace(mask=types.SimpleNamespace(as_tensor=lambda: marks), summary=lambda: rows)

    monkeypatch.setattr(MedCAM, "explain", explain)
    report = explain_slide(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                           path, tmp_path / "out", level=0, tile=64, min_tissue=0.0, target_layers=[], progress=False)
    rows = list(csv.DictReader(report.outputs["tiles"].open()))
    assert len(rows) == 17 * 25 and {(r["height"], r["width"]) for r in rows if r["row"] == "16"} == {("2", "64"), ("2", "5")}
    evidence = tifffile.imread(report.outputs["evidence"], key=0)
    assert evidence.shape == (1026, 1541) and ((evidence > 0) == red).all()
    picture = np.asarray(Image.open(report.outputs["thumbnail"]))  # level 0 itself, under 2,048 px (level 2 before session 33)
    blue = (picture[..., 2] > 150) & (picture[..., 0] < 100)
    assert picture.shape[1] == 1541 and blue[1024:1026, :1536].mean() > 0.9  # the 2 px row's outlines, two rows high
    assert blue[300:340, 1536:1541].any(axis=1).all()  # the 5 px column's, beside the red mark they hold


def test_edge_tiles_are_padded_with_the_slides_background(tmp_path, monkeypatch):
    """On a dark (fluorescence-like) slide, the part of an edge tile beyond the slide is the slide's
    background for the classifier, not white (a bright band the classifier never saw in training)."""
    import types

    rng = np.random.default_rng(0)
    image = rng.integers(0, 12, (300, 330, 3), dtype=np.uint8)  # near-black background
    image[100:200, 100:250] = (40, 200, 90)  # a green-fluorescent patch of tissue
    write_pyramidal_tiff(image, tmp_path / "dark.tif", levels=2)
    grey = np.repeat(image[..., 1:2], 3, axis=2)
    grey[40:280, 20:330] = 150  # one channel, tissue over most of the slide and to its right edge: no colour to find it by
    write_pyramidal_tiff(grey, tmp_path / "grey.tif", levels=2)
    seen = []

    def explain(self, x, class_idx=None, names=None):
        seen.append(x.clone())
        marks = torch.zeros(x.shape[0], 1, *x.shape[2:])
        rows = [dict(label=0, prob_input=0.9, prob_evidence=0.9, prob_background=0.9, area=0.0, verified=True,
                     settled=True, vacuous=True, steps=0, retries=0)] * x.shape[0]
        return types.SimpleNamespace(mask=types.SimpleNamespace(as_tensor=lambda: marks), summary=lambda: rows)

    monkeypatch.setattr(MedCAM, "explain", explain)
    for name, tissue in (("dark.tif", 200), ("grey.tif", 150)):
        seen.clear()
        explain_slide(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                      tmp_path / name, tmp_path / "out", level=0, tile=64, min_tissue=0.0, target_layers=[], progress=False)
        tiles = torch.cat(seen)  # 5 x 6 tiles of 64 px, in grid order; the last row is 44 px high, the last column 10 px wide
        assert tiles.shape == (30, 3, 64, 64)
        padding = torch.cat([tiles[-6:, :, 44:].flatten(), tiles[5::6, :, :, 10:].flatten()])
        assert float(padding.max()) <= 12 / 255, f"{name}: edge tiles padded brighter than the slide's background"
        assert round(float(tiles[:, 1].max()) * 255) == tissue  # the tissue itself is read as it is


def test_the_thumbnail_caption_and_key_wrap_below_the_picture(tmp_path):
    """Below the slide, the caption (wrapped after its commas) and the colours' key: the picture keeps
    its pixels, and a narrow slide gets a white margin wide enough for the key."""
    from PIL import Image

    from monai_medcam.wsi import LEGEND_WIDTH, SlideTile, _caption, _thumbnail

    rows = [{"label": 0}, {"label": 1}, {"label": 0}, {"label": 2}]
    assert _caption(2, 64, rows, {0: "no lesion", 1: "lesion"}) == "level 2, 64 px tiles; 4 tissue tiles: 2 no lesion, 1 lesion, 1 class 2"
    assert _caption(0, 224, []) == "level 0, 224 px tiles; 0 tissue tiles"
    # a class asked for (--class-idx): each tile's label is that class, not the classifier's call
    assert _caption(2, 64, rows, {1: "lesion"}, class_idx=1) == "level 2, 64 px tiles; 4 tissue tiles, lesion explained on each"
    rgb = np.random.default_rng(0).integers(0, 256, (3, 80, 120), dtype=np.uint8)
    tiles = [SlideTile(0, 0, 0, 0, 0, 40, 40, 1.0)]
    short = np.asarray(Image.open(_thumbnail(rgb, np.zeros((80, 120), np.uint8), 1.0, tmp_path / "a.png", tiles, 40, caption="x")))
    long = np.asarray(Image.open(_thumbnail(rgb, np.zeros((80, 120), np.uint8), 1.0, tmp_path / "b.png", tiles, 40, unverified={0},
                                            caption=", ".join(["many words in a long caption"] * 6))))
    for picture in (short, long):
        assert picture.shape[1] == LEGEND_WIDTH and picture.shape[0] > 80
        assert (picture[2:38, 2:38] == rgb.transpose(1, 2, 0)[2:38, 2:38]).all()  # inside the tile's outline: the slide's pixels
        assert (picture[:80, 120:] == 255).all()  # the margin beside the slide is white
        strip = picture[80:]
        yellow = (strip[..., 0] > 200) & (strip[..., 1] > 180) & (strip[..., 2] < 60)
        blue = (strip[..., 2] > 150) & (strip[..., 0] < 100)
        assert yellow.sum() >= 20 and blue.sum() >= 20  # the key's outlined squares
    assert long.shape[0] >= short.shape[0] + 2 * 16  # the long caption wraps onto more lines


def test_the_thumbnail_outlines_tiles_whose_evidence_is_not_verified_in_yellow(tmp_path):
    """A pathologist must see which tiles' red is not backed by a verified mask: those tiles are
    outlined in a thicker yellow, the others in blue."""
    from PIL import Image

    from monai_medcam.wsi import SlideTile, _thumbnail

    rgb = np.full((3, 200, 300), 240, np.uint8)
    mask = np.zeros((200, 300), np.uint8)
    tiles = [SlideTile(0, 0, 0, 0, 0, 100, 100, 1.0), SlideTile(1, 0, 1, 0, 100, 100, 100, 1.0)]
    picture = np.asarray(Image.open(_thumbnail(rgb, mask, 1.0, tmp_path / "thumb.png", tiles, 100, unverified={1})))[:200]
    yellow = (picture[..., 0] > 200) & (picture[..., 1] > 180) & (picture[..., 2] < 60)
    blue = (picture[..., 2] > 150) & (picture[..., 0] < 100)
    ys, xs = np.nonzero(yellow)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 99, 100, 199)  # tile 1's box, two pixels wide
    assert yellow[50, 100] and yellow[50, 101] and not yellow[50, 102]
    ys, xs = np.nonzero(blue)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 99, 0, 99)  # tile 0 (its right edge under tile 1's left)
    assert not blue[50, 100]
