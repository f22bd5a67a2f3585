"""Shared fixtures: simulated data files made once per session, the venv's tools, a quiet TensorFlow."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def fixed_file(tmp_path_factory):
    """512 simulated fixed-angle showers in the authors' layout."""
    from gan import showers

    path = tmp_path_factory.mktemp("data") / "EleEscan_1_1.h5"
    showers.write(path, "fixed", 512, seed=11)
    return path


@pytest.fixture(scope="session")
def angle_file(tmp_path_factory):
    from gan import showers

    path = tmp_path_factory.mktemp("data") / "EleEscan_RandomAngle_1_1.h5"
    showers.write(path, "angle", 96, seed=12)
    return path


@pytest.fixture(scope="session")
def horovodrun():
    exe = BIN / "horovodrun"
    if not exe.exists():
        exe = shutil.which("horovodrun")
    if not exe:
        pytest.fail("horovodrun not found: run `bash harness/setup.sh --test` first")
    return str(exe)


def run_module(module, *args, timeout=600, env=None):
    """Run ``python -m module args`` with this interpreter; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
