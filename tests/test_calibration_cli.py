"""``itmrt calibrate`` and ``itmrt build`` on an exported bundle with torch blocked (as on an edge board)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.calibration_helpers import make_data, make_naaf_bundle

ROOT = Path(__file__).resolve().parents[1]
# torch is made unimportable before itmrt is imported: any `import torch` on the way raises ImportError.
RUNNER = "import sys; sys.modules['torch'] = None; from itmrt.cli.app import main; main(sys.argv[1:])"


def itmrt_without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    data = make_data(folder / "data")
    return make_naaf_bundle(folder, data), data


def test_calibrate_and_build_run_without_torch(exported: tuple[Path, Path]) -> None:
    bundle, data = exported
    calibrated = itmrt_without_torch(
        "calibrate", str(bundle), "--data", str(data), "--method", "percentile", "--samples", "16", "--min-samples",
        "8", "--no-progress"
    )
    assert calibrated.returncode == 0, calibrated.stderr
    assert "int8 scorer:" in calibrated.stdout and "calibration saved" in calibrated.stdout

    built = itmrt_without_torch("build", str(bundle), "--precision", "int8", "--no-progress")
    assert built.returncode == 0, built.stderr
    assert "no recalibration" in built.stdout
    if "tensorrt Python package is not installed" in built.stdout:
        assert "no TensorRT engine was built" in built.stdout

    fp16 = itmrt_without_torch("build", str(bundle), "--precision", "fp16", "--no-progress")
    assert fp16.returncode == 0, fp16.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["precisions"]) == {"fp16", "int8"}
    assert manifest["calibration"]["method"] == "percentile"
    checked = itmrt_without_torch("check", str(bundle))
    assert checked.returncode == 0, checked.stderr

    doctor = itmrt_without_torch("doctor", "--json")
    assert doctor.returncode == 0 and "ort_providers" in json.loads(doctor.stdout)


def test_user_errors_are_one_line(exported: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = exported
    few = itmrt_without_torch("calibrate", str(bundle), "--data", str(data), "--min-samples", "500", "--no-progress")
    assert few.returncode == 2 and few.stderr.startswith("error: ") and few.stderr.count("\n") == 1
    bad = itmrt_without_torch("build", str(bundle), "--precision", "int4")
    assert bad.returncode == 2 and "unknown precision 'int4'" in bad.stderr
