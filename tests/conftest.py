"""Shared fixtures: where ../shared is, and skips for what this machine lacks."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
VOCAB_DIR = SHARED_DIR / "data" / "vocab"
TRT_OPS_TSV = SHARED_DIR / "data" / "tensorrt10_onnx_ops.tsv"

# Files found as listed are recorded for later processes in the user's cache (itmrt.file_states): the tests and
# the commands they start record in a folder of their own instead.
os.environ["ITMRT_VERIFIED_CACHE"] = tempfile.mkdtemp(prefix="itmrt-verified-")
atexit.register(shutil.rmtree, os.environ["ITMRT_VERIFIED_CACHE"], True)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder beside the project; tests that read it skip when it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip("../shared is not beside the project")
    return SHARED_DIR


@pytest.fixture(scope="session")
def vocab_dir(shared_dir: Path) -> Path:
    if not VOCAB_DIR.is_dir():
        pytest.skip("../shared/data/vocab is absent")
    return VOCAB_DIR


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: torch's thread pool only adds overhead (100x on a busy 2-core machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def hostile_world(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The small bundle, gallery and inputs the hostile-input suite copies for each case (built once)."""
    from hostile_helpers import build_world

    return build_world(tmp_path_factory.mktemp("hostile"))
