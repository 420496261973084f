"""Radiology I/O: DICOM/NIfTI readers, DICOM SEG and NIfTI writers, and the explain job's geometry."""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
nibabel = pytest.importorskip("nibabel")

from pydicom.data import get_testdata_file  # noqa: E402

from monai_medcam.demo.studies import write_dicom_series  # noqa: E402
from monai_medcam.io import SOURCE_FILES, InputError, find_inputs, load_image  # noqa: E402
from monai_medcam.pipeline import explain_inputs, to_classifier_space  # noqa: E402
from monai_medcam.writers import SEGMENT_LABEL, _display_slices, write_dicom_seg, write_nifti, write_outputs  # noqa: E402
from tests.toys import RegionClassifier  # noqa: E402

MR_SMALL = Path(get_testdata_file("MR_small.dcm", download=False))
NIFTI = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy (dicom3tools) prints for ``path``."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy not found: install dicom3tools (make test does: apt-get install dicom3tools)")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _pattern(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """An asymmetric binary pattern ``(1, *shape)``: any axis swap or slice shuffle changes it."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((1,) + shape, generator=g) > 0.7).float()


def _seg_by_instance(path: Path, sources: list[pydicom.Dataset]) -> dict[str, np.ndarray]:
    """The SEG's evidence on each source instance: its segments together (verified or not)."""
    seg = hd.seg.segread(path)
    uids = [ds.SOPInstanceUID for ds in sources]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=seg.segment_numbers)
    return {uid: pixels[k].max(-1) for k, uid in enumerate(uids)}


def _frames_per_segment(path: Path) -> int:
    seg = pydicom.dcmread(path)
    return int(seg.NumberOfFrames) // len(seg.SegmentSequence)


@pytest.fixture()
def shuffled_series(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 6-slice series whose file names run against the Instance Numbers, and its pixels (K, rows, cols)."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 3000, (6, 40, 56)).astype(np.uint16)
    paths = write_dicom_series(tmp_path / "series", volume, "test series")
    for k, path in enumerate(paths):  # file names in reverse slice order
        path.rename(path.with_name(f"file_{len(paths) - k:02d}.dcm"))
    return tmp_path / "series", volume


def test_single_dicom_reads_as_monai_orders_it():
    image = load_image(find_inputs(MR_SMALL)[0][0])
    ds = pydicom.dcmread(MR_SMALL)
    assert image.shape == (1, 64, 64)
    assert np.array_equal(image[0].numpy(), ds.pixel_array.T.astype(np.float32))
    assert image.meta[SOURCE_FILES] == [str(MR_SMALL)]


@pytest.mark.parametrize("name", ["series", "patient [1] *T1?"])
def test_series_slices_follow_instance_numbers(shuffled_series, name):
    """Also in a folder whose name glob would take for a pattern (MONAI's reader globs the folder)."""
    folder, volume = shuffled_series
    folder = folder.rename(folder.with_name(name))
    items, errors = find_inputs(folder)
    assert errors == [] and len(items) == 1 and items[0].kind == "dicom_series"
    image = load_image(items[0])
    assert image.shape == (1, 56, 40, 6)
    for k, path in enumerate(image.meta[SOURCE_FILES]):
        ds = pydicom.dcmread(path)
        assert int(ds.InstanceNumber) == k + 1
        assert np.array_equal(image[0, ..., k].numpy().T, volume[k].astype(np.float32))


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "SC_rgb.dcm"])  # a planar NM image, a secondary capture
def test_seg_on_a_source_without_slice_thickness_validates_and_reads_back(name, tmp_path):
    source_path = Path(get_testdata_file(name, download=False))
    image = load_image(find_inputs(source_path)[0][0])
    mask = MetaTensor(_pattern(tuple(image.shape[1:])), meta=image.meta)
    path = write_dicom_seg(mask, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []  # NM: Slice Thickness is type 1C in the Pixel Measures macro
    source = pydicom.dcmread(source_path)
    assert "SliceThickness" not in source  # the user's file is left as it is
    frames = _seg_by_instance(path, [source])  # highdicom's reader needs it too
    assert np.array_equal(frames[source.SOPInstanceUID], mask[0].numpy().T.astype(np.uint8))


def test_seg_for_pydicom_mr_reads_back_and_validates(tmp_path):
    image = load_image(find_inputs(MR_SMALL)[0][0])
    mask = MetaTensor(_pattern((64, 64)), meta=image.meta)
    path = write_dicom_seg(mask, tmp_path / "mr_seg.dcm", label=1, class_names={0: "no lesion", 1: "Läsion\\Herd"})
    source = pydicom.dcmread(MR_SMALL)
    frames = _seg_by_instance(path, [source])
    assert np.array_equal(frames[source.SOPInstanceUID], mask[0].numpy().T.astype(np.uint8))
    seg = pydicom.dcmread(path)
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == SEGMENT_LABEL and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "130401"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "Med-CAM"
    assert seg.SegmentationType == "BINARY"
    # what a PACS lists: the class by name, as plain text (no accent, no backslash: a DICOM value separator)
    assert seg.SeriesDescription == seg.ContentDescription == "Med-CAM evidence for Lasion-Herd (class 1)"
    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.SOPInstanceUID != source.SOPInstanceUID
    assert "InstitutionName" not in seg or seg.InstitutionName != source.get("InstitutionName")  # nothing else copied
    assert dciodvfy_errors(path) == []


def test_seg_for_multislice_series_maps_frames_to_instances(shuffled_series, tmp_path):
    folder, _ = shuffled_series
    image = load_image(find_inputs(folder)[0][0])
    mask = MetaTensor(_pattern(tuple(image.shape[1:]), seed=3), meta=image.meta)
    path = write_dicom_seg(mask, tmp_path / "series_seg.dcm")
    sources = [pydicom.dcmread(f) for f in image.meta[SOURCE_FILES]]
    frames = _seg_by_instance(path, sources)
    for k, ds in enumerate(sources):
        assert np.array_equal(frames[ds.SOPInstanceUID], mask[0, ..., k].numpy().T.astype(np.uint8)), f"slice {k}"
    assert dciodvfy_errors(path) == []
    fractional = write_dicom_seg(mask, tmp_path / "soft_seg.dcm", soft_mask=mask * 0.6, fractional=True)
    assert pydicom.dcmread(fractional).SegmentationType == "FRACTIONAL"
    assert dciodvfy_errors(fractional) == []


def test_evidence_that_was_not_verified_is_a_segment_of_its_own(shuffled_series, tmp_path):
    """A viewer shows a SEG's segments by name: slice 1's evidence, not verified, is in "Med-CAM
    evidence, NOT verified", the others' in "Med-CAM evidence"; the series description says so first."""
    folder, _ = shuffled_series
    image = load_image(find_inputs(folder)[0][0])
    mask = MetaTensor(_pattern(tuple(image.shape[1:]), seed=3), meta=image.meta)
    verified = [True, False, True, True, True, True]
    sources = [pydicom.dcmread(f) for f in image.meta[SOURCE_FILES]]
    uids = [ds.SOPInstanceUID for ds in sources]
    for fractional in (False, True):
        path = write_dicom_seg(mask, tmp_path / f"seg_{fractional}.dcm", soft_mask=mask * 0.6, fractional=fractional, label=1,
                               verified=verified)
        seg = pydicom.dcmread(path)
        assert [s.SegmentLabel for s in seg.SegmentSequence] == [SEGMENT_LABEL, f"{SEGMENT_LABEL}, NOT verified"]
        assert seg.SeriesDescription == "NOT verified on 1/6: Med-CAM evidence for class 1"
        params = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
        assert "verified=5 of 6 slices" in params
        pixels = hd.seg.segread(path).get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
        expected = np.stack([mask[0, ..., k].numpy().T for k in range(6)]) * (0.6 if fractional else 1)
        for k in range(6):
            np.testing.assert_allclose(pixels[k, ..., 0 if verified[k] else 1], expected[k], atol=0.01)
            assert not pixels[k, ..., 1 if verified[k] else 0].any(), f"slice {k}"
        assert dciodvfy_errors(path) == []
    one = load_image(find_inputs(MR_SMALL)[0][0])
    path = write_dicom_seg(MetaTensor(_pattern((64, 64)), meta=one.meta), tmp_path / "mr_seg.dcm", verified=[False], label=1,
                           class_names={1: "a lesion with a name far too long for a DICOM description"})
    seg = pydicom.dcmread(path)  # nothing verified: segment 1 (verified evidence) is empty, segment 2 holds it
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [SEGMENT_LABEL, f"{SEGMENT_LABEL}, NOT verified"]
    assert not hd.seg.segread(path).get_pixels_by_source_instance([pydicom.dcmread(MR_SMALL).SOPInstanceUID], segment_numbers=[1]).any()
    assert len(seg.SeriesDescription) == 64 and seg.SeriesDescription.startswith("NOT verified: Med-CAM evidence for a lesion")
    assert seg.SeriesDescription.endswith(" (class 1)")  # the name shortened, not the class
    assert dciodvfy_errors(path) == []
    # a 3D classifier's one decision over the series, not verified: one check, not six
    path = write_dicom_seg(mask, tmp_path / "volume_seg.dcm", verified=[False])
    seg = pydicom.dcmread(path)
    assert seg.SeriesDescription == "NOT verified: Med-CAM evidence"
    assert "verified=no" in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    # nothing recorded: one segment, no claim either way
    path = write_dicom_seg(mask, tmp_path / "unknown_seg.dcm")
    seg = pydicom.dcmread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [SEGMENT_LABEL] and seg.SeriesDescription == "Med-CAM evidence"
    assert "verified" not in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    with pytest.raises(ValueError, match="2 verification flags for 6 slices"):
        write_dicom_seg(mask, tmp_path / "x.dcm", verified=[True, False])
    # write_outputs takes the flags from the summary rows (a pipeline's, or as read back from a CSV);
    # where a row does not record one, the SEG claims nothing
    rows = [{"label": 1, "prob_input": 0.9, "verified": str(v)} for v in verified]
    (path,) = write_outputs(image, mask, tmp_path / "out", "series", ["seg"], rows=rows)
    assert [s.SegmentLabel for s in pydicom.dcmread(path).SegmentSequence] == [SEGMENT_LABEL, f"{SEGMENT_LABEL}, NOT verified"]
    rows[2]["verified"] = ""
    (path,) = write_outputs(image, mask, tmp_path / "out", "series", ["seg"], rows=rows)
    assert pydicom.dcmread(path).SeriesDescription == "Med-CAM evidence"
    # slices whose "no lesion" needed no evidence (vacuous, left empty) fail the background check with
    # nothing kept (verified False in the summary): nothing to verify, counted neither way
    rows = [{"label": int(k not in (2, 3)), "prob_input": 0.9, "verified": str(k in (0, 4, 5)), "vacuous": str(k in (2, 3)),
             "area": 0.0 if k in (2, 3) else 0.1} for k in range(6)]
    (path,) = write_outputs(image, mask, tmp_path / "out", "series", ["seg"], rows=rows)
    seg = pydicom.dcmread(path)
    assert seg.SeriesDescription == "NOT verified on 1/4: Med-CAM evidence"  # slice 1 alone, of the four that needed evidence
    assert "verified=3 of 4 slices (2 needed no evidence)" in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    pixels = hd.seg.segread(path).get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    assert pixels[1, ..., 1].any() and not pixels[[0, 2, 3, 4, 5], ..., 1].any()
    for row in rows[2:4]:  # the empty "no lesion" slices passing the background check are not counted either
        row["verified"] = "True"
    seg = pydicom.dcmread(write_outputs(image, mask, tmp_path / "out", "series", ["seg"], rows=rows)[0])
    assert "verified=3 of 4 slices (2 needed no evidence)" in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    seg = pydicom.dcmread(write_dicom_seg(mask, tmp_path / "vacuous_seg.dcm", verified=[None]))  # a whole volume's
    assert seg.SeriesDescription == "Med-CAM evidence" and len(seg.SegmentSequence) == 1
    assert "verified=no evidence needed" in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters


def test_nifti_and_png_show_evidence_that_was_not_verified_apart(tmp_path, drawn_panels):
    """The NIfTI writes evidence that was not verified as label 2 (the SEG's segment 2, the MONAI
    Label app's label); the PNG shows such slices first, in red, and says how many it leaves out."""
    import nibabel

    mask = MetaTensor(torch.zeros(1, 16, 16, 6), affine=torch.eye(4, dtype=torch.float64))
    mask[0, 4:8, 4:8, :5] = 1  # slices 0-4 hold evidence, slice 5 none
    rows = [{"slice": k, "label": 1, "prob_input": p, "prob_evidence": 0.9, "prob_background": 0.8 if k != 3 else 0.02,
             "area": 16 / 256, "verified": k != 3, "settled": True, "vacuous": False} for k, p in enumerate([0.99, 0.7, 0.95, 0.6, 0.9, 0.8])]
    rows[5].update(area=0.0, vacuous=True, verified=False, label=0)  # an empty "no lesion": nothing to verify
    image = MetaTensor(torch.rand(1, 16, 16, 6), affine=mask.affine)
    write_outputs(image, mask, tmp_path, "vol", ["nifti", "png"], rows=rows, display_slices=None)
    written = np.asarray(nibabel.load(tmp_path / "vol_evidence.nii.gz").dataobj)
    assert written[..., 3].max() == 2 and set(np.unique(written[..., [0, 1, 2, 4]])) == {0, 1} and not written[..., 5].any()
    from monai_medcam.writers import evidence_class, panel_slices

    assert panel_slices(rows) == [3, 0, 2, 4, 1]  # not verified first, then the surest calls; never the vacuous slice
    optimised = [*rows[:5], {**rows[5], "area": 0.05, "prob_input": 0.99}]  # without skip_vacuous: a mask, failing its check
    assert panel_slices(optimised) == [5, 3, 0, 2, 4, 1]  # both not verified, the surer first; shown as the NIfTI's label 2 and the SEG's segment 2 mark it
    assert evidence_class(rows) == 1  # the class of every decision that needed evidence
    write_outputs(image, mask, tmp_path, "vol", ["png"], title="vol", rows=rows, display_slices=panel_slices(rows))
    drawn = drawn_panels[-1]
    assert [t.split("\n")[0] for t in drawn["titles"]] == ["vol slice 0 (0-5)", "vol slice 2 (0-5)", "vol slice 3 (0-5)"]
    assert drawn["notes"]["Med-CAM evidence"][2][1] == "red" and drawn["heading"].startswith("3 of 5 slices with evidence shown")
    write_outputs(image, mask, tmp_path, "vol", ["nifti"], rows=[{**r, "verified": True} for r in rows])
    assert set(np.unique(np.asarray(nibabel.load(tmp_path / "vol_evidence.nii.gz").dataobj))) == {0, 1}  # all verified: binary


def test_volume_panels_are_shown_as_radiology_shows_each_plane(tmp_path, drawn_panels):
    """A NIfTI stored LAS (nibabel's test MRI) drawn as stored is upside down (anterior at the
    bottom): its panels are flipped to anterior up, the patient's right on the viewer's left, and
    the edges marked; DICOM's axial, coronal and sagittal storage is already so; no orientation, as stored."""
    from monai_medcam.visualize import display_orientation

    assert display_orientation(np.diag([-1.0, 1, 1, 1])) == (False, False, True, ("R", "L", "A", "P"))  # LAS: flip down
    assert display_orientation(np.diag([-1.0, -1, 1, 1])) == (False, False, False, ("R", "L", "A", "P"))  # DICOM axial (LPS)
    assert display_orientation(np.diag([1.0, 1, 1, 1])) == (False, True, True, ("R", "L", "A", "P"))  # RAS: both
    coronal = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # rows to L, columns to I, slices to A
    assert display_orientation(coronal) == (False, False, False, ("R", "L", "S", "I"))
    sagittal = np.array([[0.0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # to P, to I, slices to R
    assert display_orientation(sagittal) == (False, False, False, ("A", "P", "S", "I"))
    swapped = np.array([[0.0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # axis 0 to P, axis 1 to L: transposed
    assert display_orientation(swapped) == (True, False, False, ("R", "L", "A", "P"))
    assert display_orientation(np.zeros((4, 4))) is None
    # an LAS volume with evidence at its anterior end (high axis-1 index) and on the patient's left (high axis 0)
    image = MetaTensor(torch.rand(1, 16, 12, 4), affine=torch.diag(torch.tensor([-1.0, 1, 1, 1], dtype=torch.float64)))
    mask = MetaTensor(torch.zeros(1, 16, 12, 4), affine=image.affine)
    mask[0, 13:16, 9:12, 1] = 1
    write_outputs(image, mask, tmp_path, "las", ["png"])
    drawn = drawn_panels[-1]
    shown = drawn["columns"][SEGMENT_LABEL][0, 0]  # (rows, columns) as drawn
    assert drawn["edges"] == ("R", "L", "A", "P") and shown[:3, 13:].all() and shown.sum() == 9  # anterior up, left on the right
    # the same LAS volume whose affine is in LPS (MONAI's readers with affine_lps_to_ras=False): drawn the same
    lps = MetaTensor(image.as_tensor(), affine=torch.diag(torch.tensor([1.0, -1, 1, 1], dtype=torch.float64)), meta={"space": "LPS"})
    write_outputs(lps, mask, tmp_path, "lps", ["png"])
    assert drawn_panels[-1]["edges"] == ("R", "L", "A", "P") and torch.equal(drawn_panels[-1]["columns"][SEGMENT_LABEL], drawn["columns"][SEGMENT_LABEL])
    write_outputs(MetaTensor(torch.rand(1, 16, 12, 4), meta={"medcam_not_a_volume": "a cine"}), mask, tmp_path, "cine", ["png"])
    assert drawn_panels[-1]["edges"] is None and drawn_panels[-1]["columns"][SEGMENT_LABEL][0, 0][9:12, 13:].all()  # as stored


def test_seg_writer_refuses_mismatched_mask(shuffled_series, tmp_path):
    image = load_image(find_inputs(shuffled_series[0])[0][0])
    wrong = MetaTensor(torch.zeros(1, 56, 40, 5), meta=image.meta)
    with pytest.raises(ValueError, match="5 slices but the source has 6"):
        write_dicom_seg(wrong, tmp_path / "bad.dcm")
    with pytest.raises(ValueError, match="source DICOM files"):
        write_dicom_seg(MetaTensor(torch.zeros(1, 8, 8)), tmp_path / "bad.dcm")
    assert not list(tmp_path.glob("*bad*")) and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("source", ["nifti", "dicom"])
def test_nifti_mask_has_the_source_affine(source, shuffled_series, tmp_path):
    item = find_inputs(NIFTI if source == "nifti" else shuffled_series[0])[0][0]
    image = load_image(item)
    mask = MetaTensor(_pattern(tuple(image.shape[1:])), meta=image.meta)
    path = write_nifti(mask, tmp_path / "mask.nii.gz")
    written = nibabel.load(path)
    assert np.allclose(written.affine, image.affine.numpy(), atol=1e-5)
    if source == "nifti":
        assert np.allclose(written.affine, nibabel.load(NIFTI).affine, atol=1e-5)
    assert np.array_equal(np.asarray(written.dataobj), mask[0].numpy().astype(np.uint8))


def _bright_box_series(folder: Path) -> np.ndarray:
    """A series (12 slices of 48 x 64) with a bright box where a 3D RegionClassifier at 32^3 looks."""
    rng = np.random.default_rng(1)
    volume = rng.uniform(0, 900, (12, 48, 64))
    volume[3:6, 12:24, 16:32] += 2600  # slices 3-5, rows 12-23, columns 16-31 == region 8:16 of 32 per axis
    write_dicom_series(folder, volume.astype(np.uint16), "box")
    return volume


@pytest.mark.parametrize("dims", [3, 2])
def test_explain_job_puts_evidence_on_the_right_instances(dims, tmp_path):
    """3D classifier over the series, and 2D slice by slice: SEG frames and NIfTI agree, on the right slices."""
    _bright_box_series(tmp_path / "box")
    items, _ = find_inputs(tmp_path / "box")
    size = (32, 32, 32) if dims == 3 else (32, 32)
    net = RegionClassifier(size=32, spatial_dims=dims, threshold=0.6)
    settings = dict(max_retries=0, seed=0)  # the 3D defaults (area weight 120, lr decay 0.99) for the volume
    report = explain_inputs(net, items, tmp_path / "out", ("seg", "nifti"), spatial_dims=dims, channels=1, size=size,
                            target_layers=[], progress=False, **settings)
    assert report.failures == {}
    mask = np.asarray(nibabel.load(tmp_path / "out" / "box_evidence.nii.gz").dataobj)  # (columns, rows, slices)
    sources = [pydicom.dcmread(f) for f in load_image(items[0]).meta[SOURCE_FILES]]
    frames = _seg_by_instance(tmp_path / "out" / "box_evidence_seg.dcm", sources)
    for k, ds in enumerate(sources):
        assert np.array_equal(frames[ds.SOPInstanceUID], mask[..., k].T), f"instance {ds.InstanceNumber}"
    box = np.zeros_like(mask, dtype=bool)
    box[16:32, 12:24, 3:6] = True
    inside = (mask.astype(bool) & box).sum() / max(mask.sum(), 1)
    on_box_slices = [k for k in range(12) if mask[..., k].any()]
    if dims == 3:
        assert inside > 0.4, f"{inside:.2f} of the evidence in the box"  # 0.69 measured; 0.10 with the 2D defaults
        assert box[..., 3:6].sum() * 0.9 <= (mask.astype(bool) & box).sum()  # the box itself is kept
        off = mask[..., [k for k in range(12) if not 2 <= k <= 6]].sum()  # away from the box's slices 3-5
        assert off <= 0.02 * mask.sum(), f"{off} of {mask.sum()} evidence voxels on slices {on_box_slices}"  # 4 of 840 measured
    else:  # slices without the box are explained as class 0; the box slices' evidence is on the box
        rows = [r for r in report.rows if r["label"] == 1]
        assert sorted(int(r["slice"]) for r in rows) == [3, 4, 5]
        box_share = (mask[..., 3:6].astype(bool) & box[..., 3:6]).sum() / max(mask[..., 3:6].sum(), 1)
        assert box_share > 0.6
    assert (tmp_path / "out" / "summary.csv").is_file()


def test_a_series_is_reoriented_for_the_classifier_and_its_evidence_written_back(tmp_path):
    """A 2D classifier that looks where RAS slices put the box, not where the series stores it (LPS):
    given ``orientation``, the box's slices are called class 1 and the evidence is on the box in the
    series' own geometry (NIfTI and SEG); R-A-I also reverses the slices, and the rows follow the
    series' slice numbers."""
    rng = np.random.default_rng(1)
    volume = rng.uniform(0, 900, (12, 48, 64))
    volume[6:9, 24:36, 32:48] += 2600  # slices 6-8; flipped in-plane (LPS -> RAS): rows 12-23, columns 16-31
    write_dicom_series(tmp_path / "box", volume.astype(np.uint16), "box")
    items, _ = find_inputs(tmp_path / "box")
    net = RegionClassifier(size=32, spatial_dims=2, threshold=0.6)
    as_read = torch.stack(to_classifier_space(load_image(items[0]), 2, 1, (32, 32), items[0].path))
    assert not net(as_read).argmax(1).any()  # as read, the classifier does not see the box
    options = dict(spatial_dims=2, channels=1, size=(32, 32), target_layers=[], progress=False, max_retries=0, seed=0)
    report = explain_inputs(net, items, tmp_path / "out", ("seg", "nifti"), orientation="rai", **options)
    assert report.failures == {}
    assert [int(r["slice"]) for r in report.rows] == list(range(12))
    assert [int(r["slice"]) for r in report.rows if r["label"] == 1] == [6, 7, 8]
    mask = np.asarray(nibabel.load(tmp_path / "out" / "box_evidence.nii.gz").dataobj)  # (columns, rows, slices)
    box = np.zeros_like(mask, dtype=bool)
    box[32:48, 24:36, 6:9] = True
    share = (mask[..., 6:9].astype(bool) & box[..., 6:9]).sum() / max(mask[..., 6:9].sum(), 1)
    assert share > 0.6, f"{share:.2f} of the box slices' evidence on the box"
    sources = [pydicom.dcmread(f) for f in load_image(items[0]).meta[SOURCE_FILES]]
    frames = _seg_by_instance(tmp_path / "out" / "box_evidence_seg.dcm", sources)
    for k, ds in enumerate(sources):
        assert np.array_equal(frames[ds.SOPInstanceUID], mask[..., k].T), f"instance {ds.InstanceNumber}"

    report = explain_inputs(net, items, tmp_path / "across", ("nifti",), orientation="RSA", **options)
    assert "sliced along its axis 1" in report.failures[items[0].label] and not report.rows
    with pytest.raises(ValueError, match="orientation 'RAX': give three axis codes"):
        explain_inputs(net, items, tmp_path / "bad", ("nifti",), orientation="RAX", **options)
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_a_bundles_own_preprocessing_is_applied_and_inverted_onto_the_series(tmp_path, caplog, drawn_panels):
    """A 3D classifier trained after MONAI's Orientationd, Spacingd, an intensity window and Resized
    looks where those put the box, not where Med-CAM's own preprocessing (stretch and resize) does:
    with the bundle's preprocessing the volume is called class 1 and its evidence, inverted through
    the transforms, lies on the box in the series' own geometry (NIfTI and SEG)."""
    from monai.transforms import Compose, LoadImaged, Orientationd, Resized, ScaleIntensityRanged, Spacingd, ToTensord

    from monai_medcam.preprocessing import BundlePreprocessing

    rng = np.random.default_rng(2)
    volume = rng.uniform(0, 900, (12, 48, 64))
    volume[3:9, 8:20, 40:56] += 2600  # slices 3-8, rows 8-19, columns 40-55
    write_dicom_series(tmp_path / "box", volume.astype(np.uint16), "box", spacing=(2.0, 2.0, 4.0))
    items, _ = find_inputs(tmp_path / "box")
    transform = [LoadImaged("image"), Orientationd("image", axcodes="RAS"), Spacingd("image", pixdim=(3.0, 3.0, 3.0)),
                 ScaleIntensityRanged("image", a_min=0, a_max=3500, b_min=0, b_max=1, clip=True), ToTensord("image"),
                 Resized("image", spatial_size=(32, 32, 32))]  # a list, as a bundle may give it
    preprocessing = BundlePreprocessing(transform, "test bundle")
    # the loader left out, and ToTensord (its inverse would give the next one a NumPy array)
    assert preprocessing.names == ["Orientationd", "Spacingd", "ScaleIntensityRanged", "Resized"]
    image = load_image(items[0])
    prepared = preprocessing(image)
    net = RegionClassifier(size=32, spatial_dims=3, threshold=0.6)
    net.window.copy_((prepared[0] > 0.7).float())  # where the box lands in the classifier's input
    assert 100 < net.window.sum() < 2000 and net(prepared[None].float()).argmax(1).item() == 1
    medcams_own = to_classifier_space(image, 3, 1, (32, 32, 32), items[0].path)[0]
    assert net(medcams_own[None]).argmax(1).item() == 0  # Med-CAM's own preprocessing puts the box elsewhere

    options = dict(spatial_dims=3, channels=1, size=(32, 32, 32), target_layers=[], progress=False, max_retries=0, seed=0,
                   steps=60, lr_decay=0.99, restarts=0)
    report = explain_inputs(net, items, tmp_path / "out", ("seg", "nifti", "png"), preprocessing=preprocessing, **options)
    assert report.failures == {} and [r["label"] for r in report.rows] == [1]
    # the 3D classifier's one decision: the panels show the slices with the most evidence (slice 0 until session 33)
    shown = [int(t.split(" slice ")[1].split(" ")[0]) for t in drawn_panels[0]["titles"]]
    assert len(shown) == 3 and all(3 <= k < 9 for k in shown), shown
    written = nibabel.load(tmp_path / "out" / "box_evidence.nii.gz")
    mask = np.asarray(written.dataobj).astype(bool)  # (columns, rows, slices), the series' grid
    assert mask.shape == (64, 48, 12) and np.allclose(written.affine, np.asarray(image.affine))  # the series', as read
    box = np.zeros_like(mask)
    box[40:56, 8:20, 3:9] = True
    share = (mask & box).sum() / max(mask.sum(), 1)
    assert mask.sum() > 20 and share > 0.8, f"{mask.sum()} voxels of evidence, {share:.2f} of it on the box"
    sources = [pydicom.dcmread(f) for f in image.meta[SOURCE_FILES]]
    frames = _seg_by_instance(tmp_path / "out" / "box_evidence_seg.dcm", sources)
    for k, ds in enumerate(sources):
        assert np.array_equal(frames[ds.SOPInstanceUID], mask[..., k].T), f"instance {ds.InstanceNumber}"

    # a 2D bundle's preprocessing does not take a volume: its slices get Med-CAM's own, with a warning
    flat = BundlePreprocessing(Compose([ScaleIntensityRanged("image", a_min=0, a_max=3500, b_min=0, b_max=1)]), "2D bundle")
    report = explain_inputs(RegionClassifier(size=32), items, tmp_path / "dims", ("nifti",), preprocessing=flat,
                            **{**options, "spatial_dims": 2, "size": (32, 32), "steps": 2})
    assert report.failures == {} and [int(r["slice"]) for r in report.rows] == list(range(12))
    assert "a volume for a 2D classifier: its slices are prepared by Med-CAM's own preparation" in caplog.text
    assert "not by BundlePreprocessing(ScaleIntensityRanged; from 2D bundle)" in caplog.text
    from PIL import Image  # a colour picture for a grey classifier: its channels averaged after the bundle's preprocessing

    Image.fromarray(rng.integers(0, 255, (40, 48, 3)).astype(np.uint8)).save(tmp_path / "colour.png")
    picture = find_inputs(tmp_path / "colour.png")[0]
    report = explain_inputs(RegionClassifier(size=32), picture, tmp_path / "colour", ("nifti",),
                            preprocessing=BundlePreprocessing(Resized("image", spatial_size=(32, 32)), "2D bundle"),
                            **{**options, "spatial_dims": 2, "size": (32, 32), "steps": 2})
    assert report.failures == {} and len(report.rows) == 1
    assert nibabel.load(tmp_path / "colour" / "colour_evidence.nii.gz").shape == (48, 40)  # the picture's (columns, rows)


def test_evidence_thinner_than_a_source_voxel_survives_the_inversion():
    """Where the bundle's preprocessing makes the image larger (a 16 x 16 image resized to 64 x 64,
    or resampled to a finer spacing), a mask of 2 x 3 classifier pixels covers less than one source
    pixel: nearest sampling alone would drop it; it is kept, and a larger mask keeps its shape."""
    from monai.transforms import Resized, Spacingd

    from monai_medcam.preprocessing import BundlePreprocessing

    image = MetaTensor(torch.rand(1, 16, 16), affine=torch.eye(4))
    # Resized: input pixel i covers source pixels i/4 to (i+1)/4; Spacingd (61 x 61): input pixel i is at source pixel i/4
    for transform, ends in ((Resized("image", spatial_size=(64, 64)), (32, 24)), (Spacingd("image", pixdim=(0.25, 0.25)), (29, 21))):
        preprocessing = BundlePreprocessing(transform, "test")
        prepared = preprocessing(image)
        thin = torch.zeros(1, *prepared.shape[1:])
        thin[0, 33:35, 20:23] = 1
        back = preprocessing.invert(thin, prepared, soft=False)
        assert back.shape == (1, 16, 16) and 1 <= back.sum() <= 4 and back[0, 7:10, 4:7].sum() == back.sum(), type(transform)
        block = torch.zeros(1, *prepared.shape[1:])
        block[0, 16 : ends[0], 8 : ends[1]] = 1  # source pixels 4-7 and 2-5
        back = preprocessing.invert(block, prepared, soft=False)
        expected = torch.zeros(1, 16, 16)
        expected[0, 4:8, 2:6] = 1
        assert torch.equal(back, expected), type(transform)

def test_lazy_transforms_are_inverted_and_what_cannot_be_undone_is_refused_first(tmp_path):
    """A bundle's transforms marked lazy are run (and inverted) at once; a preprocessing whose inverse
    does not give back the source's shape (a crop by a Lambdad without inv_func) fails the input
    before its optimisation, naming it."""
    from monai.transforms import Lambdad, Resized, Spacingd

    from monai_medcam.preprocessing import BundlePreprocessing

    image = MetaTensor(torch.rand(1, 16, 12, 8), affine=torch.diag(torch.tensor([1.0, 1.5, 3.0, 1.0])))
    lazy = BundlePreprocessing([Spacingd("image", pixdim=(2.0, 2.0, 2.0), lazy=True), Resized("image", (32, 32, 32), lazy=True)], "lazy")
    prepared = lazy(image)
    assert prepared.shape == (1, 32, 32, 32)
    assert lazy.invert(torch.ones(1, 32, 32, 32), prepared, soft=False).shape == (1, 16, 12, 8)
    from monai_medcam.transforms import PREPROCESSED_KEY, ToClassifierSpace, evidence_in_source

    plain = ToClassifierSpace(3, 1, preprocessing=lazy)(torch.rand(1, 16, 12, 8))  # an array: the bundle's transforms all the same
    assert plain.shape == (1, 32, 32, 32) and plain.meta[PREPROCESSED_KEY] and len(plain.applied_operations) == 2
    with pytest.raises(ValueError, match="put it back with that preprocessing's invert"):
        evidence_in_source(MetaTensor(torch.zeros(1, 32, 32, 32), meta=dict(plain.meta)), image)

    nifti = tmp_path / "volume.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).random((16, 12, 8)).astype(np.float32), np.eye(4)), nifti)
    cut = BundlePreprocessing([Lambdad("image", lambda x: x[:, :8]), Resized("image", (32, 32, 32))], "cutting bundle")
    report = explain_inputs(RegionClassifier(spatial_dims=3), find_inputs(nifti)[0], tmp_path / "out", ("nifti",), spatial_dims=3,
                            channels=1, preprocessing=cut, **QUICK)
    problem = report.failures[str(nifti)]
    assert "BundlePreprocessing(Lambdad, Resized; from cutting bundle) cannot be undone on its evidence" in problem
    assert "shape (8, 12, 8); the source has (16, 12, 8)" in problem and not report.rows

def test_find_inputs_reports_bad_files(tmp_path):
    test_files = Path(get_testdata_file("MR_small.dcm", download=False)).parent
    shutil.copy(test_files / "MR_truncated.dcm", tmp_path / "truncated.dcm")
    shutil.copy(test_files / "rtplan.dcm", tmp_path / "plan.dcm")
    shutil.copy(test_files / "no_meta.dcm", tmp_path / "corrupt.dcm")
    (tmp_path / "page.dcm").write_text("<html>404 Not Found</html>")  # a download that failed, saved as DICOM
    bare = pydicom.dcmread(MR_SMALL)  # a data set written without preamble and file meta (DCMTK's --write-dataset)
    bare.preamble, bare.file_meta = None, pydicom.dataset.FileMetaDataset()
    bare.save_as(tmp_path / "bare.dcm", enforce_file_format=False, implicit_vr=False, little_endian=True)
    shutil.copy(test_files / "liver_1frame.dcm", tmp_path / "seg.dcm")  # a DICOM SEG exported beside its series
    shutil.copy(get_testdata_file("emri_small.dcm", download=False), tmp_path / "enhanced.dcm")  # multi-frame (pydicom-data)
    shutil.copy(test_files / "rtdose.dcm", tmp_path / "dose.dcm")  # a dose grid: pixel data, not an image
    (tmp_path / "notes.txt").write_text("not an image")
    # cut short inside its pixel data: pydicom warns and returns an empty data set, which is not "no image"
    shutil.copy(get_testdata_file("emri_small_jpeg_2k_lossless_too_short.dcm", download=False), tmp_path / "short.dcm")
    shutil.copy(test_files / "rtstruct.dcm", tmp_path / "bare_rtstruct.dcm")  # a bare data set with no pixel data: passed over
    shutil.copy(test_files / "nested_priv_SQ.dcm", tmp_path / "no_bits.dcm")  # pixel data without Bits Allocated
    shutil.copytree(test_files / "dicomdirtests" / "98892003" / "MR2", tmp_path / "mixed")
    (tmp_path / "copies").mkdir()  # one image twice, in two transfer syntaxes: not two slices of a series
    shutil.copy(test_files / "MR_small.dcm", tmp_path / "copies" / "a.dcm")
    shutil.copy(test_files / "MR_small_RLE.dcm", tmp_path / "copies" / "b.dcm")
    shutil.copy(NIFTI, tmp_path / "brain.nii")
    items, errors = find_inputs(tmp_path)
    problems = {e.path.name: e.problem for e in errors}
    assert "no pixel data" in problems["plan.dcm"]
    assert "a DICOM Segmentation Storage object (an annotation of an image, not an image)" in problems["seg.dcm"]
    assert "a DICOM RT Dose object (a computed dose grid, not an image)" in problems["dose.dcm"]
    assert {type(e).__name__ for e in errors if e.path.name in ("plan.dcm", "seg.dcm", "dose.dcm", "notes.txt", "bare_rtstruct.dcm")} == {"NotAnImage"}
    assert problems["short.dcm"] == "DICOM file cut short or damaged (End of file reached before delimiter (FFFE,E0DD))."
    assert type(next(e for e in errors if e.path.name == "short.dcm")) is InputError
    assert problems["bare_rtstruct.dcm"] == "a DICOM data set without the file header and with no pixel data; nothing to explain."
    assert problems["copies"] == "files a.dcm, b.dcm hold the same image (one SOP Instance UID); keep one copy of each image in the folder."
    assert "no 'DICM' marker and no DICOM data set" in problems["corrupt.dcm"]  # garbage to pydicom (a stray first byte)
    assert "no 'DICM' marker and no DICOM data set" in problems["page.dcm"] and "force=True" not in problems["page.dcm"]
    assert "a DICOM data set without the file header" in problems["bare.dcm"] and "dcmconv <file> <new file>" in problems["bare.dcm"]
    assert "not an image file" in problems["notes.txt"]
    # two multi-slice series in one folder: each its own input, named by its Series Number (both localizers here)
    assert "differ in orientation" in problems["mixed [series 1]"] and "differ in orientation" in problems["mixed [series 2]"]
    assert sorted((i.path.name, i.kind) for i in items if i.kind != "dicom") == [("brain.nii", "nifti"), ("enhanced.dcm", "dicom_frames")]
    truncated = next(i for i in items if i.path.name == "truncated.dcm")
    with pytest.raises(InputError, match="truncated.dcm: cannot read the image"):
        load_image(truncated)
    # MONAI's reader says only "does not have pixel_array": pydicom's reason instead
    with pytest.raises(InputError, match=r"no_bits.dcm: cannot read the image \(AttributeError: Missing required element: \(0028,0100\) 'Bits Allocated'\)"):
        load_image(next(i for i in items if i.path.name == "no_bits.dcm"))
    with pytest.raises(InputError, match="no such file"):
        find_inputs(tmp_path / "absent")


def test_input_datalist_leaves_out_inputs_that_cannot_be_loaded(tmp_path, caplog):
    """A bundle's Dataset would stop the whole run at a truncated file: the datalist leaves it out, logged."""
    from monai_medcam.io import input_datalist

    test_files = Path(get_testdata_file("MR_small.dcm", download=False)).parent
    shutil.copy(MR_SMALL, tmp_path / "good.dcm")
    (tmp_path / "other").mkdir()  # its own folder: beside MR_small (same series) it would join its series
    shutil.copy(test_files / "MR_truncated.dcm", tmp_path / "other" / "truncated.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING", logger="monai_medcam.io"):
        datalist = input_datalist(tmp_path)
    assert datalist == [{"image": str(tmp_path / "good.dcm"), "image_name": "good"}]  # the name its outputs take
    assert "truncated.dcm: cannot read the image" in caplog.text and "notes.txt: not an image file" in caplog.text
    unchecked = input_datalist(tmp_path, key="img", check=False)  # listing only: the truncated file passes
    assert sorted(Path(d["img"]).name for d in unchecked) == ["good.dcm", "truncated.dcm"]
    (tmp_path / "good.dcm").unlink()  # nothing left to explain: an error, not a run that does nothing
    with pytest.raises(InputError, match=r"no image to explain here \(2 file\(s\) or folder\(s\) left out"):
        input_datalist(tmp_path)
    # a path that is not there (a bundle's --dataset_dir left as the README's example): an error, also logged,
    # as MONAI's config evaluation wraps the exception in a long traceback
    caplog.clear()
    with caplog.at_level("ERROR", logger="monai_medcam.io"), pytest.raises(InputError, match="no such file or folder"):
        input_datalist(tmp_path / "studies")
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [f"{tmp_path / 'studies'}: no such file or folder."]


def test_volume_panels_show_the_wanted_slices_that_hold_evidence():
    # slices 1..5 of a volume hold 1, 30, 4, 0, 2 evidence pixels; the panels show the first
    # candidates (most wanted first) that hold any, in slice order, whatever their area: a stalled
    # mask of most of a slice (slice 2) does not push out the slices the pipeline wants shown
    mask = torch.zeros(1, 8, 8, 6)
    for k, n in enumerate([0, 1, 30, 4, 0, 2]):
        mask[0].view(-1, 6)[:n, k] = 1
    image = torch.rand(1, 8, 8, 6)
    assert _display_slices(image, mask, 3, [3, 4, 1, 5, 2]) == ([1, 3, 5], 4)  # 4 holds none: skipped; 2 not wanted enough
    assert _display_slices(image, mask, 2, [2, 3]) == ([2, 3], 2)
    assert _display_slices(image, mask, 3, None) == ([2, 3, 5], 4)  # no preference: the most evidence
    assert _display_slices(image, torch.zeros_like(mask), 3, [4, 0, 5]) == ([4], 0)  # none holds any: the most wanted
    assert _display_slices(image, torch.zeros_like(mask), 3, None) == ([3], 0)  # no evidence, no preference: the middle


def test_one_reading_of_the_rows_labels_the_nifti(tmp_path, caplog):
    """The NIfTI, the SEG and the MONAI Label task take a slice's verification from its summary row
    the same way (visualize.verification_by_slice; the SEG's and the task's own tests check their
    outputs) and write failed evidence as label 2 (evidence_labels): here the helpers and the NIfTI."""
    from monai_medcam.visualize import evidence_labels, verification_by_slice

    rows = [{"verified": "True"}, {"verified": "False"}, {"verified": "False", "vacuous": "True", "area": "0.0"}]
    assert verification_by_slice(rows, 3) == [True, False, None]  # the empty vacuous slice: no evidence needed
    assert verification_by_slice(rows[:1], 3) == [True]  # one decision for the whole input
    assert verification_by_slice(rows[:2], 3) is None  # neither one row nor one per slice: nothing claimed
    assert verification_by_slice([rows[0], {"verified": ""}, rows[2]], 3) is None  # one not recorded
    assert verification_by_slice([], 1) is None
    mask = np.ones((2, 2, 3), dtype=np.uint8)
    assert evidence_labels(mask, [True, False, None])[0, 0].tolist() == [1, 2, 1]
    assert evidence_labels(torch.ones(2, 3), [False]).tolist() == [[2.0] * 3] * 2  # one flag covers it all
    assert evidence_labels(mask, [True, None, True]) is mask and evidence_labels(mask, None) is mask
    image = MetaTensor(torch.rand(1, 8, 8, 3), affine=torch.eye(4))
    written = MetaTensor(torch.ones(1, 8, 8, 3), affine=torch.eye(4))
    (path,) = write_outputs(image, written, tmp_path, "vol", ["nifti"], rows=rows)
    assert nibabel.load(path).get_fdata()[0, 0].tolist() == [1, 2, 1]
    with caplog.at_level(logging.WARNING, logger="monai_medcam.writers"):
        (path,) = write_outputs(image, written, tmp_path, "vol", ["nifti"], rows=rows[:2])
    assert nibabel.load(path).get_fdata()[0, 0].tolist() == [1, 1, 1]
    assert "vol: 2 summary rows for 3 slices; the outputs record no verification." in caplog.text


def test_panels_say_the_decision_and_whether_the_evidence_is_verified():
    from monai_medcam.visualize import evidence_caption

    row = dict(label=1, prob_input=0.968, prob_evidence=0.994, verified=True, settled=True, vacuous=False)
    assert evidence_caption(row) == ("class 1 (prob 0.97)", "verified (alone: prob 0.99)", "black")
    assert evidence_caption({**row, "verified": False, "prob_evidence": 0.404}) == ("class 1 (prob 0.97)", "NOT verified (alone: prob 0.40)", "red")
    # which check failed shows: the label kept alone (0.98), lost under a random background (0.01)
    failed = {**row, "verified": False, "prob_evidence": 0.98, "prob_background": 0.0123}
    assert evidence_caption(failed)[1] == "NOT verified (alone: prob 0.98,\nworst random background: prob 0.01)"
    assert evidence_caption({**failed, "prob_evidence": ""})[1] == "NOT verified (worst random background: prob 0.01)"
    assert evidence_caption({**row, "settled": False}) == ("class 1 (prob 0.97)", "verified (alone: prob 0.99), unsettled", "darkorange")
    assert evidence_caption({**row, "label": 0, "vacuous": True})[1:] == ("no evidence needed: given on a blank image", "dimgray")
    # a vacuous decision whose optimised mask fails under random backgrounds is not verified; one left
    # empty (skip_vacuous) has no evidence to verify, whatever random content around nothing gives
    assert evidence_caption({**row, "vacuous": True, "verified": False, "area": 0.05})[1:] == ("NOT verified (alone: prob 0.99)", "red")
    assert evidence_caption({**row, "vacuous": True, "verified": False, "area": 0.0})[1:] == ("no evidence needed: given on a blank image", "dimgray")
    assert evidence_caption({**row, "vacuous": "True", "verified": "False", "area": "0.0"})[2] == "dimgray"  # read from a CSV
    assert evidence_caption({**row, "vacuous": False, "verified": False, "area": 0.0})[2] == "red"  # evidence needed, none verified
    assert evidence_caption({**row, "vacuous": True, "verified": False})[2] == "red"  # no area recorded: taken to hold evidence
    assert evidence_caption(row, whole="volume")[0] == "volume: class 1 (prob 0.97)"  # a 3D classifier's one decision
    # as read back from summary.csv (text) or decollated (floats)
    assert evidence_caption({k: str(v) for k, v in {**row, "verified": False}.items()})[2] == "red"
    assert evidence_caption({**row, "label": 1.0, "verified": 1.0, "settled": 0.0})[2] == "darkorange"
    assert evidence_caption({**row, "prob_evidence": ""})[1] == "verified"  # no probability on the evidence: none shown
    assert evidence_caption({**row, "verified": None}) == ("class 1 (prob 0.97)", "", "black")  # not recorded: no verdict
    for missing in ({"label": 1}, {}, {**row, "label": ""}, {**row, "prob_input": float("nan")}):
        assert evidence_caption(missing) is None  # no decision recorded: no caption


def test_class_names_come_in_class_order_or_by_index():
    from monai_medcam.visualize import class_names_map, class_text, evidence_caption

    assert class_names_map("no lesion, lesion") == {0: "no lesion", 1: "lesion"}
    assert class_names_map(["normal", "", "tumour"]) == {0: "normal", 2: "tumour"}  # an empty name is no name
    assert class_names_map({"0": "no lesion", "1": "lesion"}) == {0: "no lesion", 1: "lesion"}  # a bundle's channel_def
    assert class_names_map(None) == {} and class_names_map({"0": None, "1": "lesion"}) == {1: "lesion"}
    assert class_names_map({"benign": "0", "1": "lesion"}) == {1: "lesion"}  # not a class index: left out (logged)
    with pytest.raises(ValueError, match="names in class order or a mapping"):
        class_names_map(3)
    names = class_names_map("no lesion,lesion")
    assert (class_text(1, names), class_text(2, names), class_text(1)) == ("lesion", "class 2", "class 1")
    row = dict(label=1, prob_input=0.968, prob_evidence=0.994, verified=True, settled=True, vacuous=False)
    assert evidence_caption(row, names)[0] == "lesion (prob 0.97)"
    assert evidence_caption(row, {1: "a lesion that needs a second look"})[0] == "a lesion that needs a s~ (prob 0.97)"


def test_series_geometry_from_positions_single_slices_and_tilts(tmp_path):
    """Shared Instance Numbers (anonymised or converted series) are ordered by the slices' positions;
    two stacks at the same depths, shifted within their plane, are not one volume; a single sagittal
    slice's affine has the slice normal as its third axis (MONAI's reader leaves (0, 0, 1) there,
    in the slice's own plane: a singular affine); a gantry tilt's sheared affine goes to the NIfTI as
    its sform alone (a qform, a rotation, would misplace the last slices by centimetres); a series
    split over two folders is refused, not explained as two volumes (single slices of a series
    sorted into folders stay 2D inputs)."""
    import nibabel

    from monai_medcam.io import find_input

    def series(name, edit):
        files = write_dicom_series(tmp_path / name, np.arange(4 * 6 * 8, dtype=np.uint16).reshape(4, 6, 8), name)
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            edit(k, ds)
            ds.save_as(f)
        return files

    files = series("shared", lambda k, ds: setattr(ds, "InstanceNumber", 1 if k < 2 else 7 - k))  # 1, 1, 5, 4
    (item,), errors = find_inputs(tmp_path / "shared")
    assert not errors and item.files == tuple(files)  # in space, as the positions run
    shifted = series("shifted", lambda k, ds: setattr(ds, "ImagePositionPatient", [-8.0 + 10 * (k % 2), -6.0, 2.2 * (k // 2)]))
    items, errors = find_inputs(tmp_path / "shifted")
    assert not items and "share a position" in errors[0].problem and shifted[0].name in errors[0].problem

    def sagittal(k, ds):
        ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.SliceThickness = [0, 1, 0, 0, 0, -1], [30.0, -6.0, 8.0], 3.0

    single = series("sagittal", sagittal)[0]
    image = load_image(find_input(single))
    affine = image.affine.numpy()
    assert np.allclose(affine[:3, 2], [3.0, 0, 0])  # the normal (-1, 0, 0) in LPS, times the thickness, in RAS
    nifti = nibabel.load(write_nifti(MetaTensor(torch.ones_like(image), meta=dict(image.meta)), tmp_path / "sag.nii.gz"))
    voxel = np.array([5, 3, 0, 1])  # column 5, row 3: LPS (30, -6 + 5 * 2, 8 - 3 * 2)
    assert np.allclose(nifti.get_sform() @ voxel, [-30, 6 - 10, 2, 1]) and np.allclose(nifti.get_qform() @ voxel, [-30, -4, 2, 1])

    def tilted(k, ds):
        ds.ImagePositionPatient = [-8.0, -6.0 + 2.2 * k * np.tan(np.radians(20)), 2.2 * k]  # 20 degrees of gantry tilt

    series("tilted", tilted)
    volume = load_image(find_input(tmp_path / "tilted"))
    nifti = nibabel.load(write_nifti(MetaTensor(torch.ones_like(volume), meta=dict(volume.meta)), tmp_path / "tilt.nii.gz"))
    assert int(nifti.header["qform_code"]) == 0 and int(nifti.header["sform_code"]) == 1
    assert np.allclose(nifti.get_sform() @ [0, 0, 3, 1], [8.0, 6.0 - 3 * 2.2 * np.tan(np.radians(20)), 6.6, 1])
    axial = nibabel.load(write_nifti(MetaTensor(torch.ones_like(image), meta=dict(load_image(find_input(tmp_path / "shared")).meta)),
                                     tmp_path / "axial.nii.gz"))
    assert int(axial.header["qform_code"]) == 1  # no tilt: both
    from monai_medcam.io import _uneven_slice_gaps

    assert _uneven_slice_gaps([round(0.625 * k, 2) for k in range(40)]) is None  # 0.62 and 0.63 mm: positions to 0.01 mm
    assert _uneven_slice_gaps([0.0, 0.625, 1.25, 1.95, 2.5]) == "0.55-0.7 mm"
    assert _uneven_slice_gaps([-99.5, 103, 104.3, 105.5]) == "1.2-202.5 mm"  # 77654033/CT2
    split = series("split", lambda k, ds: None)  # one series whose files an export put in two folders
    for k, f in enumerate(split):
        (tmp_path / "split" / "ab"[k % 2]).mkdir(exist_ok=True)
        f.rename(tmp_path / "split" / "ab"[k % 2] / f.name)
    items, errors = find_inputs(tmp_path / "split")
    assert not items and len(errors) == 1 and "is split over the folders" in errors[0].problem
    assert str(tmp_path / "split" / "a") in errors[0].problem and str(tmp_path / "split" / "b") in errors[0].problem
    keys = series("keys", lambda k, ds: None)[:2]  # single slices of one series sorted into folders: 2D inputs each
    for k, f in enumerate(keys):
        (tmp_path / "keys" / f"k{k}").mkdir()
        f.rename(tmp_path / "keys" / f"k{k}" / f.name)
    for f in (tmp_path / "keys").glob("*.dcm"):
        f.unlink()
    items, errors = find_inputs(tmp_path / "keys")
    assert not errors and [i.kind for i in items] == ["dicom", "dicom"]


TEST_FILES = MR_SMALL.parent
QUICK = dict(steps=10, max_retries=0, seed=0, target_layers=[], progress=False)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # the damaged header, on purpose
def test_damaged_headers_and_non_volume_series_are_reported_by_name(tmp_path):
    """A damaged number in one header is that file's problem, not the folder's crash; slices in two
    orientations (localizers) are not one volume; slices sharing an Instance Number are named; the
    output folder inside the input folder is not searched (a second run would explain its outputs)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    bad = pydicom.dcmread(MR_SMALL)  # NumberOfFrames '1A' (as in pydicom's badVR.dcm, an RT Dose: not an image)
    bad[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)
    bad.save_as(tmp_path / "bad.dcm")
    shutil.copy(MR_SMALL, tmp_path / "good.dcm")
    shutil.copytree(TEST_FILES / "dicomdirtests" / "98892001" / "CT2N", tmp_path / "localizers")
    write_dicom_series(tmp_path / "twins", np.zeros((3, 8, 8), np.uint16), "twins")
    for k in (1, 2, 3):  # no orientation, so no position along the slices to order them by
        twin = pydicom.dcmread(tmp_path / "twins" / f"slice_00{k}.dcm")
        del twin.ImageOrientationPatient
        twin.InstanceNumber = min(k, 2) - (k == 2)  # 1, 1, 2
        twin.save_as(tmp_path / "twins" / f"slice_00{k}.dcm")
    (tmp_path / "out").mkdir()
    shutil.copy(NIFTI, tmp_path / "out" / "brain_evidence.nii")
    items, errors = find_inputs(tmp_path, exclude=tmp_path / "out")
    problems = {e.path.name: e.problem for e in errors}
    assert problems["bad.dcm"] == "damaged DICOM header: NumberOfFrames is '1A', not a number."
    assert "differ in orientation (a localizer or a radial acquisition)" in problems["localizers"]
    assert "slices slice_001.dcm, slice_002.dcm share an Instance Number and no position" in problems["twins"]
    assert [i.path.name for i in items] == ["good.dcm"]
    assert "brain_evidence.nii" in [i.path.name for i in find_inputs(tmp_path)[0]]  # without exclude it is an input
    shutil.copy(NIFTI, tmp_path / "good_evidence.nii.gz")  # an output beside its input (--output = --input)
    (tmp_path / "summary.csv").write_text("input\n")
    beside = [i.path.name for i in find_inputs(tmp_path, exclude=tmp_path)[0]]
    assert "good_evidence.nii.gz" not in beside and "good.dcm" in beside and "brain_evidence.nii" in beside
    assert [i.path.name for i in find_inputs(tmp_path / "out", exclude=tmp_path)[0]] == ["brain_evidence.nii"]  # output above


def test_odd_volumes_each_get_their_own_answer(tmp_path):
    """In one run: a volume of one slice (2D classifier) is explained and written in its own geometry;
    a 4D NIfTI is refused instead of having its volumes averaged as if they were colours; a grey +
    alpha PNG is explained; a series with uneven slice gaps gets its SEG and PNG but no NIfTI (whose
    grid would misplace slices); a source without a Study Instance UID gets its NIfTI and PNG and a
    failure naming what the SEG misses. Nothing stops the other inputs."""
    from PIL import Image

    brain = nibabel.load(NIFTI)
    nibabel.save(nibabel.Nifti1Image(np.asarray(brain.dataobj)[:, :, 12:13], brain.affine), tmp_path / "one_slice.nii.gz")
    shutil.copy(Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz", tmp_path / "four_d.nii.gz")
    grey = np.zeros((40, 40, 2), np.uint8)
    grey[..., 0], grey[..., 1] = np.arange(40, dtype=np.uint8)[:, None] * 6, 255
    Image.fromarray(grey, "LA").save(tmp_path / "grey_alpha.png")
    shutil.copytree(TEST_FILES / "dicomdirtests" / "77654033" / "CT2", tmp_path / "uneven")  # z -99.5, 103, 104.3, 105.5
    shutil.copy(TEST_FILES / "JPEGLSNearLossless_16.dcm", tmp_path / "no_study.dcm")
    items, errors = find_inputs(tmp_path)
    assert errors == []
    report = explain_inputs(RegionClassifier(), items, tmp_path / "out", ("seg", "nifti", "png"), channels=1, size=(32, 32), **QUICK)
    out = tmp_path / "out"
    assert sorted(Path(k).name for k in report.failures) == ["four_d.nii.gz", "no_study.dcm", "uneven"]
    problems = {Path(k).name: v for k, v in report.failures.items()}
    assert "a 4D NIfTI with 2 volumes" in problems["four_d.nii.gz"]
    assert problems["uneven"].startswith("NIfTI not written (ValueError: the source's slices are unevenly spaced (gaps 1.2")
    assert problems["uneven"].endswith("written: uneven_evidence_seg.dcm, uneven_evidence.png")
    assert "DICOM SEG not written" in problems["no_study.dcm"] and "has no StudyInstanceUID" in problems["no_study.dcm"]
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([
        "grey_alpha_evidence.nii.gz", "grey_alpha_evidence.png", "no_study_evidence.nii.gz", "no_study_evidence.png",
        "one_slice_evidence.nii.gz", "one_slice_evidence.png", "summary.csv", "uneven_evidence.png", "uneven_evidence_seg.dcm",
    ])
    one = nibabel.load(out / "one_slice_evidence.nii.gz")
    assert one.shape == (brain.shape[0], brain.shape[1], 1) and np.allclose(one.affine, brain.affine)
    assert _frames_per_segment(out / "uneven_evidence_seg.dcm") == 4
    inputs = sorted({Path(r["input"]).name for r in report.rows})  # rows of what was written, failures included
    assert inputs == ["grey_alpha.png", "no_study.dcm", "one_slice.nii.gz", "uneven"]
    assert len(report.rows) == 1 + 1 + 1 + 4


def test_seg_only_for_a_non_dicom_input_is_a_failure_before_any_work(tmp_path):
    items, _ = find_inputs(NIFTI)
    report = explain_inputs(RegionClassifier(), items, tmp_path / "out", ("seg",), channels=1, size=(32, 32), **QUICK)
    assert report.failures == {str(NIFTI): "a DICOM SEG needs a DICOM source and this input is not DICOM; nothing written "
                                           "(add --format nifti or png)."}
    assert report.rows == [] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv"]
    assert (tmp_path / "out" / "summary.csv").read_text().splitlines()[1:] == []  # this run's: no row


def test_an_earlier_runs_record_goes_with_its_summary_and_is_not_an_input(tmp_path):
    """A run without a record of its own (a Python caller) removes an earlier run's run.json with its
    summary.csv; in an output folder that is the input folder, run.json is passed over as an output."""
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    (tmp_path / "run.json").write_text('{"status": "finished"}')
    items, bad = find_inputs(tmp_path, exclude=tmp_path)
    assert [item.path.name for item in items] == ["mr.dcm"] and bad == []
    explain_inputs(RegionClassifier(), items, tmp_path, ("nifti",), channels=1, size=(32, 32), **QUICK)
    assert not (tmp_path / "run.json").exists() and (tmp_path / "mr_evidence.nii.gz").is_file()


def test_an_unreadable_image_gets_one_line_from_its_own_reader(tmp_path):
    """MONAI's LoadImage reports every registered reader's traceback when the chosen one fails: the
    message keeps the chosen reader's error, on one line."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "fake.nii.gz").write_text("not gzip")
    for name, reason in (("empty.png", "UnidentifiedImageError: cannot identify image file"),
                         ("fake.nii.gz", "ImageFileError: File ")):
        with pytest.raises(InputError) as caught:
            load_image(find_inputs(tmp_path / name)[0][0])
        assert caught.value.problem.startswith("cannot read the image (") and reason in caught.value.problem
        assert "\n" not in caught.value.problem and "Traceback" not in caught.value.problem


def test_binary_masks_shrunk_back_keep_their_evidence():
    """A source smaller than the classifier's input: each source pixel is evidence where any classifier
    pixel it covers is (nearest sampling dropped a one-pixel line at 64 -> 20, and all of a tiny image's
    evidence); growing axes stay nearest, exactly as before."""
    from monai_medcam.pipeline import back_to_source

    line = torch.zeros(1, 1, 64, 64)
    line[0, 0, 10, 5:40] = 1  # rows 9.4-12.5 of the source's 20 cover classifier row 10: source row 3
    assert torch.nn.functional.interpolate(line, size=(20, 20), mode="nearest-exact").sum() == 0
    shrunk = back_to_source(line, (20, 20), soft=False)
    assert shrunk[0, 0].nonzero()[:, 0].unique().tolist() == [3] and shrunk[0, 0, 3].nonzero().flatten().tolist() == list(range(1, 13))
    box = torch.zeros(1, 1, 32, 32)
    box[0, 0, 8:16, 12:20] = 1
    assert torch.equal(back_to_source(box, (40, 48), soft=False), torch.nn.functional.interpolate(box, size=(40, 48), mode="nearest-exact"))
    assert back_to_source(box, (1, 1), soft=False).item() == 1.0
    mixed = back_to_source(box, (16, 64), soft=False)[0, 0]  # rows halve, columns double
    assert mixed.nonzero()[:, 0].unique().tolist() == list(range(4, 8)) and mixed[4].nonzero().flatten().tolist() == list(range(24, 40))


def test_a_multi_page_tiff_is_refused_not_cut_to_its_first_page(tmp_path):
    import tifffile

    with tifffile.TiffWriter(tmp_path / "stack.tif") as tif:
        for k in range(3):
            tif.write(np.full((16, 16), 40 * k, np.uint8))
    tifffile.imwrite(tmp_path / "single.tif", np.zeros((16, 16), np.uint8))
    with pytest.raises(InputError, match="stack.tif: 3 pages or frames; only single images are read"):
        load_image(find_inputs(tmp_path / "stack.tif")[0][0])
    assert load_image(find_inputs(tmp_path / "single.tif")[0][0]).shape == (1, 16, 16)


def test_a_slice_that_cannot_be_read_is_named_and_no_other_reader_steps_in(shuffled_series, monkeypatch):
    """Given a reader, MONAI's LoadImage falls back to its other readers when it fails; its default
    PydicomReader would then read the folder without the bad slice: a shorter volume whose slices no
    longer match the source files the SEG references."""
    folder, _ = shuffled_series
    item = find_inputs(folder)[0][0]
    bad = item.files[2]
    read = pydicom.dcmread

    def rejecting(fp, *args, **kwargs):
        if str(fp) == str(bad):
            raise pydicom.errors.InvalidDicomError("damaged (test)")
        return read(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", rejecting)
    with pytest.raises(InputError, match=f"{bad.name}: cannot read this slice of the series \\(InvalidDicomError: damaged"):
        load_image(item)


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def test_a_study_folder_holds_several_series_and_radiographs(tmp_path):
    """A flat export of a study: two volumes and two radiographs of one series in one folder. Each
    volume is an input of its own, told apart by its Series Number (in messages, the summary and the
    output names); the radiographs (no position in space) are one input each; a MONAI datalist gives
    a volume that shares its folder as its file list, which LoadInput reads back as that volume."""
    from monai_medcam.io import find_input, input_datalist, output_names

    study = tmp_path / "study"
    for number, (name, depth) in enumerate((("t1", 3), ("t2", 4)), start=3):
        for k, path in enumerate(write_dicom_series(tmp_path / name, np.full((depth, 8, 8), number, np.uint16), name)):
            _edit(path, SeriesNumber=number)
            study.mkdir(exist_ok=True)
            path.rename(study / f"{name}_{k}.dcm")
    for k in range(2):  # two views of one radiograph series: no Image Position (Patient)
        shutil.copy(MR_SMALL, study / f"view_{k}.dcm")
        _edit(study / f"view_{k}.dcm", SOPInstanceUID=f"1.2.3.4.{k}", SeriesInstanceUID="1.2.3.9", ImagePositionPatient=None)
    items, errors = find_inputs(study)
    assert errors == []
    series = {i.label: i for i in items if i.kind == "dicom_series"}
    assert sorted(series) == [f"{study} [series 3]", f"{study} [series 4]"]
    assert [len(series[f"{study} [series {n}]"].files) for n in (3, 4)] == [3, 4]
    assert sorted(i.path.name for i in items if i.kind == "dicom") == ["view_0.dcm", "view_1.dcm"]
    assert sorted(output_names(items)) == ["study_s3", "study_s4", "view_0", "view_1"]
    volumes = [d["image"] for d in input_datalist(study) if isinstance(d["image"], list)]
    assert sorted(len(v) for v in volumes) == [3, 4]
    assert sorted(find_input(v).name for v in volumes) == ["study_s3", "study_s4"]
    assert load_image(find_input(volumes[0])).shape[-1] == len(volumes[0])
    report = explain_inputs(RegionClassifier(), items, tmp_path / "out", ("seg", "png"), channels=1, size=(32, 32), **QUICK)
    assert report.failures == {}
    assert sorted({(r["input"], r["evidence"]) for r in report.rows if r["input"].endswith("]")}) == [
        (f"{study} [series 3]", "study_s3"), (f"{study} [series 4]", "study_s4")]
    assert _frames_per_segment(tmp_path / "out" / "study_s4_evidence_seg.dcm") == 4


def test_echoes_in_one_series_are_refused_before_any_work_and_interleaved_numbers_stack_in_space(tmp_path):
    paths = write_dicom_series(tmp_path / "echoes", np.zeros((4, 8, 8), np.uint16), "dual echo")
    for k, path in enumerate(paths):  # positions 0, 1, 0, 1 (x 2.2 mm): echo 1 then echo 2
        _edit(path, ImagePositionPatient=[-8.0, -8.0, 2.2 * (k % 2)], EchoNumbers=1 + k // 2)
    _, errors = find_inputs(tmp_path / "echoes")
    assert len(errors) == 1 and "share a position: several echoes 1, 2 in one series" in errors[0].problem
    levels = np.arange(1, 7, dtype=np.uint16)[:, None, None] * np.ones((6, 8, 8), np.uint16)  # slice k holds k + 1
    paths = write_dicom_series(tmp_path / "interleaved", levels, "interleaved")
    for path, number in zip(paths, (1, 4, 2, 5, 3, 6)):  # the acquisition order, not the order in space
        _edit(path, InstanceNumber=number)

    def stacked() -> list[int]:
        (item,), errors = find_inputs(tmp_path / "interleaved")
        assert errors == [] and [p.name for p in item.files] == [p.name for p in paths]  # in space: slice_001 ... 006
        image = load_image(item)
        assert image.meta[SOURCE_FILES] == [str(p) for p in item.files]
        return [int(image[0, 0, 0, k]) for k in range(image.shape[-1])]  # the pixels follow the files (the SEG's frames)

    assert stacked() == [1, 2, 3, 4, 5, 6]
    for path in paths:  # no Instance Numbers at all: the positions order the slices
        _edit(path, InstanceNumber=None)
    assert stacked() == [1, 2, 3, 4, 5, 6]
    _edit(paths[2], ImagePositionPatient=None)  # one slice without a position: not one volume
    _, errors = find_inputs(tmp_path / "interleaved")
    assert len(errors) == 1 and "slices slice_003.dcm have no Image Position (Patient) while the others do" in errors[0].problem


def test_a_palette_colour_image_is_read_in_its_colours():
    from pydicom.pixels import apply_color_lut

    path = Path(get_testdata_file("examples_palette.dcm", download=False))  # ultrasound, 8-bit indices, 16-bit table
    image = load_image(find_inputs(path)[0][0])
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds)  # (rows, columns, 3)
    assert image.shape == (3, ds.Columns, ds.Rows)
    np.testing.assert_allclose(image.numpy().transpose(2, 1, 0) * 65535, rgb, atol=0.5)


def test_output_names_come_from_the_paths_not_the_order(tmp_path):
    from monai_medcam.io import ImageInput, output_names

    p1, p2, p0 = (ImageInput(tmp_path / p / "CT", "dicom_series") for p in ("p1", "p2", "p0"))
    assert output_names([p1, p2]) == ["p1_CT", "p2_CT"]
    assert output_names([p0, p1, p2]) == ["p0_CT", "p1_CT", "p2_CT"]  # p1 keeps its name when p0 joins
    alone = ImageInput(tmp_path / "x" / "brain.nii.gz", "nifti")
    assert output_names([alone, p1]) == ["brain", "CT"]
    assert output_names([alone, alone]) == ["brain", "brain_1"]  # the same input twice
    other = ImageInput(tmp_path / "y" / "brain_1.nii.gz", "nifti")
    assert output_names([alone, alone, other]) == ["brain", "brain_2", "brain_1"]  # no clash with another's name
    png, jpg, dup = (ImageInput(tmp_path / d / f, "image") for d, f in (("a", "scan.png"), ("a", "scan.jpg"), ("b", "scan.png")))
    assert output_names([png, jpg]) == ["scan_png", "scan_jpg"]  # the file types tell them apart
    assert output_names([png, jpg, dup]) == ["a_scan_png", "scan_jpg", "b_scan_png"]  # then the folders
    typed = ImageInput(tmp_path / "a" / "scan_png.png", "image")  # a name that is another's typed name
    assert output_names([png, jpg, typed]) == ["scan_png", "scan_jpg", "scan_png_png"]
    assert output_names([typed, jpg, png]) == ["scan_png_png", "scan_jpg", "scan_png"]  # whatever the order


def test_a_missing_decoder_says_what_to_install():
    from monai_medcam.io import _reason

    err = RuntimeError("Unable to decompress 'JPEG Lossless' pixel data because all plugins are missing dependencies:\n"
                       "    gdcm - requires gdcm>=3.0.10\n    pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1\n\nmore")
    assert _reason(err) == ("RuntimeError: Unable to decompress 'JPEG Lossless' pixel data because all plugins are missing "
                            "dependencies: gdcm - requires gdcm>=3.0.10; pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1")


def test_jpeg_lossless_dicom_is_read():
    """JPEG Lossless (Process 14), the usual compression of CT and MR archive exports, needs pylibjpeg (the dicom extra)."""
    image = load_image(find_inputs(get_testdata_file("JPEG-LL.dcm", download=False))[0][0])
    assert image.shape == (1, 256, 1024) and float(image.max()) > float(image.min())


@pytest.mark.parametrize("name", ["chrH31.dcm", "chrI2.dcm", "anonymised.dcm"])
def test_seg_on_japanese_korean_and_anonymised_sources(name, tmp_path):
    # Japanese and Korean sources name the default repertoire first ('', 'ISO 2022 IR 87'), which
    # highdicom refuses: the SEG is in UTF-8, the names kept. An anonymised source without Patient ID,
    # Sex, Birth Date or Study ID gets them empty (type 2 in a SEG), and ACR-NEMA's 11:20:00 is 112000
    from pydicom.data import get_charset_files

    if name == "anonymised.dcm":
        source = pydicom.dcmread(MR_SMALL)
        for keyword in ("PatientID", "PatientSex", "PatientBirthDate", "StudyID"):
            delattr(source, keyword)
        source.StudyTime, source.StudyDate = "11:20:00", "1993.05.26"
        source_path = tmp_path / name
        source.save_as(source_path)
    else:
        source_path = Path(get_charset_files(name)[0])
    source = pydicom.dcmread(source_path)
    image = load_image(find_inputs(source_path)[0][0])
    mask = MetaTensor(_pattern(tuple(image.shape[1:3])), meta=image.meta)
    path = write_dicom_seg(mask, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(path)
    assert seg.PatientName == source.PatientName and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.PatientID == source.get("PatientID", "") and seg.PatientSex == source.get("PatientSex", "")
    assert seg.get("SpecificCharacterSet") == ("ISO_IR 192" if name.startswith("chr") else source.get("SpecificCharacterSet"))
    assert np.array_equal(_seg_by_instance(path, [source])[source.SOPInstanceUID], mask[0].numpy().T.astype(np.uint8))
    assert dciodvfy_errors(path) == []
    if name == "anonymised.dcm":
        assert (seg.StudyTime, seg.StudyDate, seg.PatientBirthDate) == ("112000", "19930526", "")
        assert "PatientID" not in pydicom.dcmread(source_path)  # the user's file is left as it is


def test_a_slice_whose_pixel_data_is_short_is_named(shuffled_series):
    folder, _ = shuffled_series
    item = find_inputs(folder)[0][0]
    ds = pydicom.dcmread(item.files[3])
    ds.PixelData = ds.PixelData[:-1000]  # a truncated copy
    ds.save_as(item.files[3])
    with pytest.raises(InputError, match=rf"{item.files[3].name}: cannot read this slice of the series .*less than expected"):
        load_image(item)
    # a run's failures name the slice too, below the series' folder
    report = explain_inputs(RegionClassifier(), [item], folder.parent / "out", ("nifti",), spatial_dims=2, channels=1, **QUICK)
    assert report.failures[item.label].startswith(f"{item.files[3].name}: cannot read this slice of the series {item.label} (")


# --- multi-frame DICOM: enhanced volumes and cines -----------------------------------------------


@pytest.fixture()
def oblique_series(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 6-slice series on oblique planes (rows along (cos 0.5, sin 0.5, 0), columns down the
    patient), pixels 0.5 mm between rows and 0.8 mm between columns, and its pixels (K, rows, cols)."""
    volume = np.random.default_rng(0).integers(0, 3000, (6, 40, 56)).astype(np.uint16)
    paths = write_dicom_series(tmp_path / "oblique", volume, "oblique series", spacing=(0.5, 0.8, 2.2))
    row, column = np.array([np.cos(0.5), np.sin(0.5), 0.0]), np.array([0.0, 0.0, -1.0])
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *column)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in np.array([10.0, -20.0, 30.0]) + 2.2 * k * np.cross(row, column)]
        ds.save_as(path)
    return tmp_path / "oblique", volume


def _enhanced(series: Path, path: Path, seed: int = 1) -> Path:
    """The single-frame ``series`` converted by highdicom into one Legacy Converted Enhanced MR file,
    its frames in a shuffled order (a multi-frame file need not store them along the normal; the
    converter keeps the order given with ``include_dimension_index=False``)."""
    slices = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    np.random.default_rng(seed).shuffle(slices)
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        slices, series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(), instance_number=1,
        include_dimension_index=False,
    )
    image.save_as(path)
    return path


def _not_an_involution(frames: list[int]) -> bool:
    """Whether a frame order differs from its own inverse (so a mapping applied backwards is caught)."""
    inverse = [0] * len(frames)
    for k, f in enumerate(frames):
        inverse[f - 1] = k + 1
    return inverse != frames


def test_a_multiframe_volume_reads_as_its_series(oblique_series, tmp_path):
    """An enhanced (multi-frame) MR holding an oblique series' slices, frames shuffled: the same
    voxels and affine as the series (non-square pixels), slices along the normal, each slice's
    frame number recorded."""
    from monai_medcam.io import NOT_A_VOLUME, SOURCE_FRAMES, find_input

    folder, volume = oblique_series
    enhanced = _enhanced(folder, tmp_path / "enhanced.dcm")
    item = find_input(enhanced)
    assert item.kind == "dicom_frames" and item.files == (enhanced,)
    series, frames = load_image(find_input(folder)), load_image(item)
    assert frames.shape == series.shape == (1, 56, 40, 6)
    assert torch.equal(frames.as_tensor(), series.as_tensor())
    assert torch.equal(frames[0, ..., 2], torch.from_numpy(volume[2].T.astype(np.float32)))
    assert np.allclose(np.asarray(frames.affine), np.asarray(series.affine), atol=1e-4)
    assert np.allclose(np.linalg.norm(np.asarray(frames.affine)[:3, :3], axis=0), [0.8, 0.5, 2.2], atol=1e-4)
    source = pydicom.dcmread(enhanced)
    depth = np.cross(*np.reshape(source.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, (2, 3)))
    along = [float(np.dot(depth, source.PerFrameFunctionalGroupsSequence[f - 1].PlanePositionSequence[0].ImagePositionPatient))
             for f in frames.meta[SOURCE_FRAMES]]
    assert along == sorted(along) and sorted(frames.meta[SOURCE_FRAMES]) == list(range(1, 7))
    assert _not_an_involution(frames.meta[SOURCE_FRAMES])  # shuffled: the order comes from the positions
    assert frames.meta[SOURCE_FILES] == [str(enhanced)] and NOT_A_VOLUME not in frames.meta


def test_a_seg_on_a_multiframe_source_references_each_frame(oblique_series, tmp_path):
    """The SEG of a multi-frame source puts slice k's mask on frame SOURCE_FRAMES[k]: the same
    pixels at each position as the SEG of the same mask on the single-frame series; dciodvfy clean.
    Also where the file keeps Plane Orientation and Pixel Measures per frame (as some scanners
    write them), which highdicom wants shared."""
    from monai_medcam.io import SOURCE_FRAMES, find_input

    folder, _ = oblique_series
    enhanced = _enhanced(folder, tmp_path / "enhanced.dcm")
    per_frame = pydicom.dcmread(enhanced)
    shared = per_frame.SharedFunctionalGroupsSequence[0]
    for group in per_frame.PerFrameFunctionalGroupsSequence:
        group.PlaneOrientationSequence = copy.deepcopy(shared.PlaneOrientationSequence)
        group.PixelMeasuresSequence = copy.deepcopy(shared.PixelMeasuresSequence)
    del shared.PlaneOrientationSequence, shared.PixelMeasuresSequence
    per_frame.save_as(tmp_path / "per_frame.dcm")
    series = load_image(find_input(folder))
    pattern = _pattern((56, 40, 6))
    on_series = write_dicom_seg(MetaTensor(pattern, meta=series.meta), tmp_path / "series_seg.dcm", label=1)
    by_instance = _seg_by_instance(on_series, [pydicom.dcmread(f) for f in series.meta[SOURCE_FILES]])
    for source_path in (enhanced, tmp_path / "per_frame.dcm"):
        frames = load_image(find_input(source_path))
        assert _not_an_involution(frames.meta[SOURCE_FRAMES])
        on_frames = write_dicom_seg(MetaTensor(pattern, meta=frames.meta), tmp_path / f"{source_path.stem}_seg.dcm", label=1)
        assert dciodvfy_errors(on_frames) == []
        seg = hd.seg.segread(on_frames)
        assert seg.NumberOfFrames == 6
        uid = pydicom.dcmread(source_path).SOPInstanceUID
        for k, frame in enumerate(frames.meta[SOURCE_FRAMES]):
            pixels = seg.get_pixels_by_source_frame(uid, [frame], segment_numbers=[1])[0, ..., 0]
            assert np.array_equal(pixels, pattern[0, ..., k].numpy().T.astype(np.uint8))
            assert np.array_equal(pixels, by_instance[pydicom.dcmread(series.meta[SOURCE_FILES][k]).SOPInstanceUID])


def test_multiframe_files_that_are_not_one_volume_are_refused(shuffled_series, tmp_path):
    """Frames sharing a position (echoes, time points), positions on some frames only, and frames
    of differing orientation: each refused with the file named, before any work."""
    from monai_medcam.io import find_input

    folder, _ = shuffled_series
    enhanced = pydicom.dcmread(_enhanced(folder, tmp_path / "enhanced.dcm"))
    groups = enhanced.PerFrameFunctionalGroupsSequence

    def variant(name: str, change) -> Path:
        ds = copy.deepcopy(enhanced)  # its sequences too
        change(ds.PerFrameFunctionalGroupsSequence)
        ds.save_as(tmp_path / name)
        return tmp_path / name

    shared = variant("echoes.dcm", lambda g: setattr(g[3].PlanePositionSequence[0], "ImagePositionPatient",
                                                     groups[1].PlanePositionSequence[0].ImagePositionPatient))
    with pytest.raises(InputError, match=r"echoes.dcm: frames 2, 4 share a position: several echoes, time points"):
        load_image(find_input(shared))

    def shifted(g):  # frame 4 moved within frame 2's plane: the same depth, so not one volume either
        x, y, z = (float(v) for v in groups[1].PlanePositionSequence[0].ImagePositionPatient)
        g[3].PlanePositionSequence[0].ImagePositionPatient = [x + 5.0, y, z]

    with pytest.raises(InputError, match=r"shifted.dcm: frames 2, 4 share a position"):
        load_image(find_input(variant("shifted.dcm", shifted)))

    def stretched(g):
        g[2].PixelMeasuresSequence = [pydicom.Dataset()]
        g[2].PixelMeasuresSequence[0].PixelSpacing = [1.0, 1.0]

    with pytest.raises(InputError, match=r"stretched.dcm: the frames differ in pixel spacing"):
        load_image(find_input(variant("stretched.dcm", stretched)))
    unplaced = variant("partial.dcm", lambda g: delattr(g[4], "PlanePositionSequence"))
    with pytest.raises(InputError, match=r"partial.dcm: only frames 1, 2, 3, 4 \.\.\. of 6 have an Image Position"):
        load_image(find_input(unplaced))

    def tilt(g):
        g[0].PlaneOrientationSequence = [pydicom.Dataset()]
        g[0].PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    with pytest.raises(InputError, match=r"tilted.dcm: the frames differ in orientation"):
        load_image(find_input(variant("tilted.dcm", tilt)))
    big_endian = Path(get_testdata_file("emri_small_big_endian.dcm", download=False))
    with pytest.raises(InputError, match=r"emri_small_big_endian.dcm: a multi-frame DICOM file in the retired big-endian"):
        load_image(find_input(big_endian))


def test_enhanced_ct_frames_in_hounsfield_units():
    """pydicom-data's enhanced CT: the rescale from its functional groups applied (air at -1024 HU,
    as MONAI reads single-frame CT), frames ordered along the normal, spacing from Pixel Measures."""
    from monai_medcam.io import SOURCE_FRAMES, find_input

    path = Path(get_testdata_file("eCT_Supplemental.dcm", download=False))
    image = load_image(find_input(path))
    stored = pydicom.dcmread(path).pixel_array  # (2, 512, 512), stored values from 0
    assert image.shape == (1, 512, 512, 2) and float(image.min()) == float(stored.min()) - 1024
    # orientation (-1, 0, 0, 0, 1, 0): the normal is -z, so frame 2 (z -149) comes before frame 1 (z -159)
    assert image.meta[SOURCE_FRAMES] == [2, 1]
    assert torch.equal(image[0, ..., 0], torch.from_numpy(stored[1].T.astype(np.float32) - 1024))
    assert np.allclose(np.asarray(image.affine)[:3, :3], np.diag([0.388672, -0.388672, -10.0]))


def test_a_cine_is_explained_frame_by_frame(tmp_path, caplog):
    """A multi-frame capture without positions in space (pydicom-data's 2-frame RGB secondary
    capture): each frame explained by a 2D classifier, NIfTI and PNG written and the SEG left out
    with the reason (highdicom needs frame positions), as for a source that is not DICOM; asked
    for a SEG only, or by a 3D classifier, refused before any work."""
    from monai_medcam.io import NOT_A_VOLUME, find_input

    path = tmp_path / "cine.dcm"
    shutil.copy(get_testdata_file("SC_rgb_2frame.dcm", download=False), path)
    image = load_image(find_input(path))
    assert image.shape == (3, 100, 100, 2) and image.meta[NOT_A_VOLUME].startswith("2 frames without a position in space each")
    frames = pydicom.dcmread(path).pixel_array  # (2, 100, 100, 3), RGB
    assert torch.equal(image[:, ..., 1], torch.from_numpy(frames[1].transpose(2, 1, 0).astype(np.float32)))
    report = explain_inputs(RegionClassifier(), [find_input(path)], tmp_path / "out", ("seg", "nifti", "png"), channels=1,
                            size=(32, 32), **QUICK)
    assert [r["slice"] for r in report.rows] == [0, 1] and report.failures == {}
    assert [p.name for p in report.written[str(path)]] == ["cine_evidence.nii.gz", "cine_evidence.png"]
    assert "cine: no DICOM SEG: highdicom writes none on 2 frames without a position in space each" in caplog.text
    assert nibabel.load(tmp_path / "out" / "cine_evidence.nii.gz").shape == (100, 100, 2)
    report = explain_inputs(RegionClassifier(), [find_input(path)], tmp_path / "seg_only", ("seg",), channels=1,
                            size=(32, 32), **QUICK)
    assert report.rows == [] and "a DICOM SEG on a multi-frame source needs its frames' positions" in report.failures[str(path)]
    report = explain_inputs(RegionClassifier(spatial_dims=3), [find_input(path)], tmp_path / "out3", ("nifti",), channels=1,
                            spatial_dims=3, size=(32, 32, 32), **QUICK)
    assert "2 frames without a position in space each (a cine or a multi-frame capture), not a volume" in report.failures[str(path)]
    assert report.rows == []
    from monai.transforms import Resized

    from monai_medcam.preprocessing import BundlePreprocessing

    through_bundle = BundlePreprocessing(Resized("image", spatial_size=(32, 32, 32)), "3D bundle")  # a cine is no volume for it either
    report = explain_inputs(RegionClassifier(spatial_dims=3), [find_input(path)], tmp_path / "out4", ("nifti",), channels=1,
                            spatial_dims=3, preprocessing=through_bundle, **QUICK)
    assert "2 frames without a position in space each (a cine or a multi-frame capture), not a volume" in report.failures[str(path)]


def test_an_enhanced_image_of_one_frame_is_a_2d_image_with_its_geometry(tmp_path):
    """MR_small.dcm converted to an enhanced MR of one frame (its geometry in the shared functional
    groups, where MONAI's reader does not look): the same pixels and in-plane affine as the
    original, a 2D image; its SEG valid and on frame 1."""
    from monai_medcam.io import PHOTOMETRIC, find_input

    source = pydicom.dcmread(MR_SMALL)
    path = tmp_path / "one_frame.dcm"
    hd.legacy.LegacyConvertedEnhancedMRImage(
        [source], series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(), instance_number=1
    ).save_as(path)
    original, enhanced = load_image(find_input(MR_SMALL)), load_image(find_input(path))
    assert find_input(path).kind == "dicom_frames" and enhanced.shape == original.shape == (1, 64, 64)
    assert torch.equal(enhanced.as_tensor(), original.as_tensor())
    assert np.allclose(np.asarray(enhanced.affine)[:, [0, 1, 3]], np.asarray(original.affine)[:, [0, 1, 3]])
    pattern = _pattern((64, 64))
    seg_path = write_dicom_seg(MetaTensor(pattern, meta=enhanced.meta), tmp_path / "seg.dcm")
    assert dciodvfy_errors(seg_path) == []
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_frame(pydicom.dcmread(path).SOPInstanceUID, [1], segment_numbers=[1])[0, ..., 0]
    assert np.array_equal(pixels, pattern[0].numpy().T.astype(np.uint8))
    # MONOCHROME1 (no Presentation LUT Shape): read as stored, as the single-frame path reads it,
    # and inverted once, later, by the explain job (highdicom would invert it a first time)
    for ds, name in ((pydicom.dcmread(MR_SMALL), "mono1.dcm"), (pydicom.dcmread(path), "mono1_frames.dcm")):
        ds.PhotometricInterpretation = "MONOCHROME1"
        if "PresentationLUTShape" in ds:
            del ds.PresentationLUTShape
        ds.save_as(tmp_path / name)
    single, frames = load_image(find_input(tmp_path / "mono1.dcm")), load_image(find_input(tmp_path / "mono1_frames.dcm"))
    assert torch.equal(frames.as_tensor(), single.as_tensor()) and torch.equal(frames.as_tensor(), original.as_tensor())
    assert frames.meta[PHOTOMETRIC] == single.meta[PHOTOMETRIC] == "MONOCHROME1"


def test_a_modality_lut_is_applied():
    """``mlut_18.dcm`` maps its stored values through a Modality LUT Sequence (stored -2048..2047 to
    0..65535): read through it, as pydicom's ``apply_modality_lut`` gives (MONAI applies a rescale only)."""
    from pydicom.pixels import apply_modality_lut

    from monai_medcam.io import find_input

    path = Path(get_testdata_file("mlut_18.dcm", download=False))
    ds = pydicom.dcmread(path)
    image = load_image(find_input(path))
    assert torch.equal(image[0], torch.from_numpy(apply_modality_lut(ds.pixel_array, ds).T.astype(np.float32)))
    assert float(image.min()) == 0.0 and float(image.max()) == 65535.0  # stored: -2048 to 2047


def test_the_progress_bar_counts_slices_from_the_headers(shuffled_series, tmp_path, monkeypatch):
    """The bar's total is every image and slice from the start (a 6-slice series, an 8-slice NIfTI,
    a radiograph: 15), so it never steps back."""
    import nibabel

    import monai_medcam.pipeline as pipeline

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n, self.totals = total, 0, [total]
            bars.append(self)

        def update(self, count):
            self.n += count

        def refresh(self):
            self.totals.append(self.total)

        def close(self):
            pass

    monkeypatch.setattr(pipeline, "tqdm", Bar)
    folder, _ = shuffled_series
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(1).random((24, 20, 8)).astype(np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    items = find_inputs(folder)[0] + find_inputs(tmp_path / "vol.nii.gz")[0] + find_inputs(MR_SMALL)[0]
    assert [pipeline.expected_images(item, 2) for item in items] == [6, 8, 1] and pipeline.expected_images(items[1], 3) == 1
    report = explain_inputs(RegionClassifier(size=32), items, tmp_path / "out", ("nifti",), spatial_dims=2, channels=1, size=(32, 32),
                            **{**QUICK, "steps": 2, "progress": True})
    assert not report.failures and bars[0].totals == [15] and bars[0].n == 15
