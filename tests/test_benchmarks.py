"""The speed benchmark runs end to end (smoke preset) and reports values in their ranges."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_speed_benchmark_smoke(tmp_path):
    pytest.importorskip("skimage")
    out = tmp_path / "speed.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--preset", "smoke", "--output", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "straightforward" in run.stdout and "Med-CAM default" in run.stdout
    report = json.loads(out.read_text())
    assert report["preset"] == "smoke" and report["device"].startswith("CPU")
    rows = {(r["setting"], r["batch"]): r for r in report["rows"]}
    assert len(rows) == 4  # baseline, Med-CAM at batch 1 and 2, the 3D row
    for (setting, _), row in rows.items():
        assert row["s_per_image"] > 0
        assert 0 <= row["area"] <= 1
        if setting.startswith("Med-CAM"):
            assert 0 <= row["verified"] <= 1 and 0 <= row["kept"] <= 1 and 0 <= row["iou"] <= 1
            assert 1 <= row["median_steps"] <= 20


@pytest.mark.timeout(600)
def test_quality_benchmark_smoke(tmp_path):
    pytest.importorskip("skimage")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--preset", "smoke", "--output", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    table = (tmp_path / "quality_smoke.md").read_text().splitlines()
    rows = [line.split("|")[1:-1] for line in table if line.startswith("| ") and not line.startswith("| method")]
    assert [r[0].strip() for r in rows][:2] == ["Med-CAM", "Grad-CAM @ Med-CAM area"] and len(rows) == 7
    for cells in rows:
        iou, kept, kept_bg = (float(c) for c in cells[1:4])
        assert 0 <= iou <= 1 and 0 <= kept <= 1 and 0 <= kept_bg <= 1
        assert 0 <= float(cells[4].strip().rstrip("%")) <= 100
    assert (tmp_path / "images" / "quality_smoke.png").stat().st_size > 10_000
