"""The MONAI Label app ``apps/medcam``, for real: a server on loopback, requests over HTTP.

MONAI Label 0.8.5 needs pydicom<3, so it runs from its own environment ``.venv-monailabel``
(``make venv-monailabel``, done by ``make test``); this test talks to it over HTTP only.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from monai_medcam.io import find_input, load_image

ROOT = Path(__file__).resolve().parents[1]
MONAILABEL = ROOT / ".venv-monailabel" / "bin" / "monailabel"
SAMPLES = ROOT / "bundles" / "medcam_explain" / "sample_data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: dict | None = None, timeout: float = 300) -> tuple[int, bytes]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not MONAILABEL.exists():
        pytest.fail(f"{MONAILABEL} is missing: run `make venv-monailabel` (make test does it).")
    root = tmp_path_factory.mktemp("monailabel")
    app = root / "app"
    app.mkdir()
    shutil.copy(ROOT / "apps" / "medcam" / "main.py", app / "main.py")
    studies = root / "studies"
    studies.mkdir()
    shutil.copy(SAMPLES / "brain.nii.gz", studies / "brain.nii.gz")
    shutil.copytree(SAMPLES / "mr_series", studies / "mr_series")
    shutil.copytree(SAMPLES / "mr_series", studies / "1.2.840.5")  # a series folder named by its UID, as PACS exports do
    (studies / "mr_small").mkdir()  # a one-file folder: a 2D image
    shutil.copy(get_testdata_file("MR_small.dcm", download=False), studies / "mr_small" / "MR_small.dcm")
    (studies / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"not a volume" * 10)  # a damaged upload
    port = _free_port()
    # the monailabel script runs `python` from PATH: the environment's own
    path = f"{MONAILABEL.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, PATH=path, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", OMP_NUM_THREADS="2")
    env.pop("PYTHONPATH", None)
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [str(MONAILABEL), "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1",
         "--port", str(port), "--conf", "classifier", str(ROOT / "bundles" / "medcam_explain"), "--conf", "steps", "40"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                status, _ = _request(f"{base}/info/", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the server did not answer in 180 s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield base, studies
    finally:  # stopped even when a test fails
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _label(content: bytes, folder: Path) -> nib.Nifti1Image:
    path = folder / "label.nii.gz"
    path.write_bytes(content)
    assert gzip.decompress(content)[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")  # a NIfTI-1 header
    return nib.load(path)


def test_info_lists_the_task(server):
    base, _ = server
    status, body = _request(f"{base}/info/")
    assert status == 200
    info = json.loads(body)
    assert "medcam" in info["models"]
    model = info["models"]["medcam"]
    assert model["type"] == "segmentation" and model["labels"] == {"evidence": 1, "evidence NOT verified": 2} and model["dimension"] == 3
    config = {name: model["config"].get(name, "absent") for name in ("steps", "class_idx", "seed")}
    assert config == {"steps": 40, "class_idx": None, "seed": 0}  # the server's default steps (--conf steps 40)
    assert info["datastore"]["total"] == 5  # two NIfTI files and three DICOM folders


@pytest.mark.parametrize("image", ["brain", "mr_series", "1.2.840.5", "mr_small"])
def test_infer_returns_evidence_in_the_source_geometry(server, image, tmp_path):
    base, studies = server
    params = {"steps": 10, **({"class_idx": 1} if image == "mr_small" else {})}  # MR_small: "no lesion" on a blank image
    status, body = _request(f"{base}/infer/medcam?image={image}&output=image", {"params": json.dumps(params)})
    assert status == 200, body[:500]
    label = _label(body, tmp_path)
    source = load_image(find_input(studies / ("brain.nii.gz" if image == "brain" else image)))  # a series: its folder
    # a 2D image's label is a one-slice volume: MONAI Label's writer keeps no 2D label's affine
    assert label.shape == tuple(source.shape[1:]) + ((1,) if source.ndim == 3 else ())
    # the NIfTI's own affine; for the series, the affine MONAI's PydicomReader gives the instances
    expected = nib.load(studies / "brain.nii.gz").affine if image == "brain" else source.affine.numpy()
    np.testing.assert_allclose(label.affine, expected, atol=1e-4)
    values = np.asarray(label.dataobj)
    assert set(np.unique(values)) <= {0, 1, 2} and values.sum() > 0  # 2: evidence that was not verified


def test_infer_json_holds_the_diagnostics(server):
    base, _ = server
    status, body = _request(f"{base}/infer/medcam?image=brain&output=json", {"params": json.dumps({"steps": 5, "seed": 3})})
    assert status == 200
    result = json.loads(body)
    medcam = result["medcam"]
    assert len(medcam["label"]) == 24 and len(medcam["verified"]) == 24  # one per slice of the 24-slice volume
    assert all(0.0 <= a <= 1.0 for a in medcam["area"]) and result["evidence_voxels"] > 0
    # slices the classifier calls "no lesion" with no evidence at all get an empty label (skip_vacuous, the task's default)
    vacuous = [a for a, v in zip(medcam["area"], medcam["vacuous"]) if v]
    assert 0 < len(vacuous) < 24 and vacuous == [0.0] * len(vacuous)


def test_bad_requests_get_4xx_and_the_server_stays_up(server):
    base, studies = server
    status, body = _request(f"{base}/infer/medcam?image=no_such_image&output=json", {"params": "{}"})
    assert status == 404 and b"no_such_image" in body
    status, body = _request(f"{base}/infer/nomodel?image=brain&output=json", {"params": "{}"})
    assert status == 404 and b"nomodel" in body
    status, body = _request(f"{base}/infer/medcam?image=brain&output=json", {"params": json.dumps({"steps": -3})})
    assert status == 400 and b"steps" in body
    status, body = _request(f"{base}/infer/medcam?image=brain&output=json", {"params": json.dumps({"class_idx": "two"})})
    assert status == 400 and b"class_idx" in body
    status, body = _request(f"{base}/infer/medcam?image=brain&output=json", {"params": json.dumps({"class_idx": 7})})
    assert status == 400 and b"class" in body  # the classifier has 2 classes
    status, body = _request(f"{base}/infer/medcam?image=broken&output=json", {"params": "{}"})
    assert status == 422 and b"broken.nii.gz" in body
    # a misspelt parameter would be passed over unseen (the default 300 steps run): refused, naming the one meant
    status, body = _request(f"{base}/infer/medcam?image=brain&output=json", {"params": json.dumps({"stepz": 10})})
    assert status == 400 and b"unknown parameter 'stepz': did you mean 'steps'?" in body
    status, body = _request(f"{base}/infer/medcam?image=brain&output=json", {"params": json.dumps({"class": 1})})
    assert status == 400 and b"did you mean 'class_idx'?" in body
    # a path on the server outside the studies (and not an upload) is not an image id
    status, body = _request(f"{base}/infer/medcam?image={SAMPLES / 'brain.nii.gz'}&output=json", {"params": "{}"})
    assert status == 404 and b"not in the studies folder" in body
    shadow = studies.parent / "brain"  # the server's working folder: MONAI Label would read this "brain" first
    shadow.write_bytes(b"not the study")
    try:
        status, body = _request(f"{base}/infer/medcam?image=brain&output=json", {"params": "{}"})
    finally:
        shadow.unlink()
    assert status == 409 and b"also names a path in the server's working folder" in body
    status, _ = _request(f"{base}/info/")
    assert status == 200


SHARE_TORCH = ROOT / "apps" / "medcam" / "share_torch.py"


def _share_torch(site: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SHARE_TORCH), str(site)], capture_output=True, text=True)


def test_share_torch_hard_links_torch_and_its_cuda_packages():
    """``make venv-monailabel`` links the main environment's torch: same files, no second copy."""
    import torch

    torch_file = Path(torch.__file__)
    version = torch.__version__.split("+")[0]
    # beside the repository, where make puts both environments (pytest's tmp_path may be another file system)
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".share-torch-test-") as folder:
        site = Path(folder)
        if site.stat().st_dev != torch_file.stat().st_dev:
            pytest.skip("torch is installed on another file system than the repository")
        out = _share_torch(site)
        assert out.returncode == 0 and f"torch {version}" in out.stdout, out.stdout + out.stderr
        assert (site / "torch" / "__init__.py").stat().st_ino == torch_file.stat().st_ino  # a hard link, not a copy
        assert (site / f"torch-{version}.dist-info" / "RECORD").is_file()
        assert (site / "torchvision").is_dir() and not (site / "numpy").exists()  # light deps: pip's job
        assert "linked 0 entries" in _share_torch(site).stdout  # what is there already is left alone
        bad = _share_torch(site / "missing")
        assert bad.returncode == 2 and "SITE_PACKAGES" in bad.stderr


def test_share_torch_on_another_file_system_leaves_nothing_behind():
    """Hard links cannot cross file systems: share_torch says so, undoes what it made, and pip installs a copy."""
    import torch

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == Path(torch.__file__).stat().st_dev:
        pytest.skip("no second file system (/dev/shm) to link across")
    with tempfile.TemporaryDirectory(dir=shm) as site:
        out = _share_torch(site)
        assert out.returncode == 0, out.stderr
        assert "could not hard-link" in out.stdout and "pip installs its own copy" in out.stdout
        assert list(Path(site).iterdir()) == []


def test_task_skips_vacuous_images_unless_told_not_to():
    """MedCAMInferTask's default skip_vacuous is true; the app's --conf word "false" turns it off (in the
    MONAI Label environment, without a server)."""
    printed = _in_monailabel_environment(
        "import torch\n"
        "from monai_medcam.monailabel import MedCAMInferTask\n"
        "from monai_medcam.settings import MedCAMSettings\n"
        "net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))\n"
        "for given in ({}, {'skip_vacuous': 'false'}, {'skip_vacuous': 'true'}):\n"
        "    inferer = MedCAMInferTask(net, **given).inferer({})\n"
        "    print(MedCAMSettings.from_kwargs(**inferer.settings).skip_vacuous)\n"
    )
    assert printed.split() == ["True", "False", "True"]


def test_evidence_that_was_not_verified_is_label_2():
    """A client shows MONAI Label's labels by name: slice 1's evidence, not verified, is 2 ("evidence
    NOT verified"), the verified slices' 1; a 2D image's one flag covers it all (in the MONAI Label
    environment, without a server)."""
    printed = _in_monailabel_environment(
        "import torch\n"
        "from monai.data import MetaTensor\n"
        "from monai_medcam.monailabel import ToSourceGeometryd\n"
        "for shape, verified in (((1, 8, 8, 3), [True, False, True]), ((1, 8, 8), [False])):\n"
        "    pred = MetaTensor(torch.ones(shape), meta={'medcam': {'verified': torch.tensor([verified])}})\n"
        "    out = ToSourceGeometryd()({'pred': pred, 'image_source': MetaTensor(torch.zeros(shape))})\n"
        "    mask = out['pred']\n"
        "    print(mask.dtype, tuple(mask.shape), [int(v) for v in mask.reshape(-1, mask.shape[-1])[0]], out['result']['evidence_voxels'])\n"
    )
    # a 2D image's label is a one-slice volume (MONAI Label's writer keeps its affine so)
    assert printed.splitlines() == ["torch.uint8 (8, 8, 3) [1, 2, 1] 192", "torch.uint8 (8, 8, 1) [2] 64"]


def test_a_reoriented_volumes_label_comes_back_to_its_voxels():
    """With ``orientation``, the task gives the classifier the volume reoriented (here R-A-I: in-plane
    flips and the slices reversed) and the label comes back to the source's voxels: the classifier's
    slice 0, not verified, is the source's slice 3, its far corner, label 2 (in the MONAI Label
    environment, without a server); codes that are not axis codes are refused when the task is made."""
    printed = _in_monailabel_environment(
        "import torch\n"
        "from monai.data import MetaTensor\n"
        "from monai_medcam.monailabel import MedCAMInferTask, ToSourceGeometryd\n"
        "net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))\n"
        "task = MedCAMInferTask(net, spatial_dims=2, channels=1, size=8, orientation='rai')\n"
        "affine = torch.diag(torch.tensor([-1.0, -1.0, 2.0, 1.0], dtype=torch.float64))\n"
        "volume = MetaTensor(torch.rand(1, 16, 12, 4), affine=affine, meta={'filename_or_obj': 'v'})\n"
        "data = task.pre_transforms({})[1]({'image': volume})\n"
        "pred = torch.zeros(1, 8, 8, 4)\n"
        "pred[0, :2, :2, 0] = 1\n"
        "flags = {'verified': torch.tensor([[False, True, True, True]])}\n"
        "out = ToSourceGeometryd()({'pred': MetaTensor(pred, meta={**data['image'].meta, 'medcam': flags}), 'image_source': volume})\n"
        "label = out['pred']\n"
        "print(tuple(label.shape), sorted({tuple(int(i) for i in ix[:2]) for ix in label.nonzero()})[::11], label.nonzero()[:, 2].unique().tolist(), int(label.max()))\n"
        "try:\n"
        "    MedCAMInferTask(net, orientation='up')\n"
        "except ValueError as err:\n"
        "    print(err)\n"
    )
    assert printed.splitlines() == ["(16, 12, 4) [(12, 9), (15, 11)] [3] 2",
                                    "orientation 'up': give three axis codes, one of L/R, A/P and S/I each (e.g. RAS, LPS), or none."]


def test_a_bundles_own_preprocessing_prepares_the_image_and_its_label_comes_back(tmp_path):
    """A bundle trained after a flip and a resize: the app's task runs that preprocessing (--conf
    preprocessing auto, the default) and inverts the label through it: on a request run as MONAI
    Label runs it, the classifier's corner comes back to the source's flipped corner, the label
    file with the source's affine; --conf size chooses
    Med-CAM's own preparation, with the reason in the warning; "bundle" with it is refused (in the
    MONAI Label environment, without a server)."""
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = {"network_def": {"_target_": "torch.nn.Sequential"},
              "preprocessing": {"_target_": "Compose", "transforms": [
                  {"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
                  {"_target_": "Flipd", "keys": "image", "spatial_axis": 0},
                  {"_target_": "Resized", "keys": "image", "spatial_size": [16, 16, 8]}]}}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    import torch

    torch.save({}, bundle / "models" / "model.pt")
    printed = _in_monailabel_environment(
        "import logging, sys, types, torch\n"
        "from monai.data import MetaTensor\n"
        f"sys.path.insert(0, {str(ROOT / 'apps' / 'medcam')!r})\n"
        "import main\n"
        "from monai_medcam.loading import load_classifier\n"
        "from monai_medcam.monailabel import MedCAMInferTask, ToSourceGeometryd\n"
        f"app = types.SimpleNamespace(loaded=load_classifier({str(bundle)!r}))\n"
        "preprocessing, why = main.MedCAMApp._preprocessing(app, {})\n"
        "print(preprocessing.names)\n"
        "print(main.MedCAMApp._preprocessing(app, {'size': '8'}))\n"
        "try:\n"
        "    main.MedCAMApp._preprocessing(app, {'preprocessing': 'bundle', 'size': '8'})\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "import nibabel, numpy as np\n"
        "from monailabel.tasks.infer.basic_infer import CallBackTypes\n"
        "affine = np.array([[-2.0, 0, 0, 10], [0, 1.5, 0, -5], [0, 0, 3, 7], [0, 0, 0, 1]])\n"
        f"source = {str(tmp_path / 'source.nii.gz')!r}\n"
        "nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).random((24, 20, 10)).astype(np.float32), affine), source)\n"
        "net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))\n"
        "task = MedCAMInferTask(net, spatial_dims=3, channels=1, preprocessing=preprocessing, steps=2, skip_vacuous=False)\n"
        "def corner(d):  # the classifier's corner as the evidence, whatever two steps gave\n"
        "    print(tuple(d['image'].shape), d['image'].meta['medcam_preprocessed'])\n"
        "    pred = torch.zeros(1, 16, 16, 8)\n"
        "    pred[0, :2, :2, 0] = 1\n"
        "    d['pred'] = MetaTensor(pred, meta=d['pred'].meta)\n"
        "    return d\n"
        "path, result = task({'image': source, 'device': 'cpu'}, callbacks={CallBackTypes.INFERER: corner})\n"
        "label = nibabel.load(path)\n"
        "where = np.argwhere(np.asarray(label.dataobj))\n"
        "print(label.shape, np.allclose(label.affine, affine, atol=1e-4), where.min(0).tolist(), where.max(0).tolist(), sorted(result['medcam']))\n"
        "try:  # the marked image's evidence cannot be put back by resizing\n"
        "    ToSourceGeometryd()({'pred': MetaTensor(torch.zeros(1, 16, 16, 8), meta={'medcam_preprocessed': True}), 'image_source': MetaTensor(torch.zeros(1, 24, 20, 10))})\n"
        "except ValueError as err:\n"
        "    print(str(err)[:60])\n"
    )
    assert printed.splitlines() == [
        "['Flipd', 'Resized']",
        "(None, \" (--conf size given: Med-CAM's own preprocessing; --conf preprocessing bundle applies the bundle's own and inverts the label through it)\")",
        "--conf preprocessing bundle: --conf size set how Med-CAM's own preprocessing prepares inputs; with the bundle's own, leave them out.",
        "(1, 16, 16, 8) True",
        "(24, 20, 10) True [21, 0, 0] [23, 2, 1] ['area', 'label', 'prob_evidence', 'settled', 'steps', 'vacuous', 'verified']",
        "the evidence is on an image a bundle's preprocessing prepare",
    ]

def _in_monailabel_environment(script: str) -> str:
    """What ``script`` prints when run by the MONAI Label environment's Python."""
    if not MONAILABEL.exists():
        pytest.fail(f"{MONAILABEL} is missing: run `make venv-monailabel` (make test does it).")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(MONAILABEL.parent / "python"), "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_app_serves_study_ids_uploads_and_sessions_not_other_paths(tmp_path):
    """A path-like ``image`` is served only inside the studies folder or the sessions store (a
    session's series is a folder), or as MONAI Label's own upload (``tmp*`` in the temporary folder)."""
    printed = _in_monailabel_environment(
        "import importlib.util, os, sys, tempfile, types\n"
        f"spec = importlib.util.spec_from_file_location('medcam_app', {str(ROOT / 'apps' / 'medcam' / 'main.py')!r})\n"
        "app_module = importlib.util.module_from_spec(spec); spec.loader.exec_module(app_module)\n"
        "from monailabel.utils.sessions import Sessions\n"
        f"root = {str(tmp_path)!r}\n"
        "studies, series, outside = (os.path.join(root, name) for name in ('studies', 'series', 'outside'))\n"
        "os.makedirs(os.path.join(studies, 'mr')); os.makedirs(series); os.makedirs(outside)\n"
        "open(os.path.join(studies, 'mr', 'a.dcm'), 'wb').close(); open(os.path.join(series, 'a.dcm'), 'wb').close()\n"
        "store = Sessions(os.path.join(root, 'sessions'))\n"
        "_, info = store.add_session(series)  # moved into the store: a folder there\n"
        "app = types.SimpleNamespace(studies=studies, sessions=lambda: store)\n"
        "upload = tempfile.NamedTemporaryFile(suffix='.nii.gz', delete=False).name\n"
        "other = os.path.join(tempfile.gettempdir(), 'someone_else.nii.gz'); open(other, 'wb').close()\n"
        "paths = [info.image, upload, os.path.join(studies, 'mr'), other, outside, os.path.join(root, 'missing')]\n"
        "print([app_module.MedCAMApp._served(app, p) for p in paths])\n"
        "os.remove(upload); os.remove(other)\n"
    )
    assert printed.strip() == "[True, True, True, False, False, False]"
