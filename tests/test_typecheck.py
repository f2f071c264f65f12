"""mypy on the torch-free packages (bundle, runtime, engine, serve, scale), against ``tensorrt-stubs`` for the
TensorRT code.

This is the project's type check: CI runs it with the rest of the suite (skipped where the stubs are not installed).

The stubs are installed outside site-packages (an installed stub folder imports
as an empty ``tensorrt`` namespace package and would look like TensorRT)::

    pip install --no-deps --target .venv/trt-stubs tensorrt-stubs==10.13.0.35.1

(``ITMRT_TRT_STUBS`` may point elsewhere.) Every published tensorrt-stubs
release names a parameter ``in`` (a Python keyword) in four plugin methods,
and ``add_scale_nd`` puts a parameter without a default after defaulted ones;
no type checker parses either. The test checks against a copy with those two
spots repaired (``in`` -> ``in_``, ``channel_axis: int = ...``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stubs_folder() -> Path:
    """``ITMRT_TRT_STUBS``, else ``.venv/trt-stubs`` of this checkout, else of the venv running the tests."""
    if "ITMRT_TRT_STUBS" in os.environ:
        return Path(os.environ["ITMRT_TRT_STUBS"])
    here = ROOT / ".venv" / "trt-stubs"
    return here if here.is_dir() else Path(sys.prefix) / "trt-stubs"


STUBS = _stubs_folder()
# The torch-free packages, checked against TensorRT's stubs: the bundle, the runtime (the native TensorRT backend
# with its CUDA context included), engine building and inspection, machine probing and
# ``itmrt doctor``, the service and sharded galleries, retrieval metrics, publishing and document reading,
# FP16/INT8 graph work and the build orchestration, and the one comparator.
TYPECHECKED = ["itmrt/bundle", "itmrt/runtime", "itmrt/engine", "itmrt/machine",
               "itmrt/reports/doctor.py", "itmrt/serve", "itmrt/scale", "itmrt/metrics",
               "itmrt/publish.py", "itmrt/documents.py", "itmrt/precision", "itmrt/build",
               "itmrt/reports/comparator.py"]


def patched_stubs(target: Path) -> Path:
    if not (STUBS / "tensorrt" / "__init__.pyi").is_file():
        pytest.skip(
            f"tensorrt-stubs not installed at {STUBS} (pip install "
            f"--no-deps --target {STUBS} tensorrt-stubs==10.13.0.35.1)"
        )
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(STUBS / package, target / package)
    bindings = target / "tensorrt_bindings" / "tensorrt.pyi"
    text = bindings.read_text(encoding="utf-8")
    text = re.sub(r"([(,]\s*)in:", r"\1in_:", text)
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    bindings.write_text(text, encoding="utf-8")
    return target


# Errors *inside* the stub files (``bool`` shadowed by an enum member, ``capsule``...) are the stubs'
# own; mypy hides them for stubs installed in site-packages, and this config does the same here.
MYPY_CONFIG = """[mypy]
ignore_missing_imports = True
[mypy-tensorrt.*,tensorrt_bindings.*]
ignore_errors = True
"""


def run_mypy(paths: list[str], stubs: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(stubs)}
    config = stubs / "mypy.ini"
    config.write_text(MYPY_CONFIG, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-incremental", "--cache-dir",
         str(stubs / ".cache"), *paths],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def test_torch_free_packages_type_check_against_tensorrt_stubs(tmp_path: Path) -> None:
    stubs = patched_stubs(tmp_path / "stubs")
    # The stubs must really be in use: a wrong call into TensorRT is reported.
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\nbuilder = trt.Builder()\nbuilder.create_network('x')\n", encoding="utf-8")
    wrong = run_mypy([str(probe)], stubs)
    assert wrong.returncode != 0 and "probe.py" in wrong.stdout, wrong.stdout
    result = run_mypy(TYPECHECKED, stubs)
    assert result.returncode == 0, result.stdout + result.stderr
    checked = int(re.search(r"in (\d+) source files?", result.stdout).group(1))  # type: ignore[union-attr]
    # every module of the checked packages
    assert checked >= sum(len(list((ROOT / folder).glob("*.py"))) for folder in TYPECHECKED), result.stdout
