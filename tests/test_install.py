"""The checkout works as users run it: from the repo root, with Hugging Face's `kernels` package installed
(transformers >= 5.25 depends on it), our top-level kernels/ folder shadows nothing."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _at_root(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_kernels_folder_is_not_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py would shadow Hugging Face's `kernels` package from the repo root (see pyproject.toml)")


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's `kernels` package is not installed")
def test_import_and_cli_from_the_repo_root_with_hf_kernels():
    r = _at_root("-c", "import flashforge_hf, kernels, flashforge_hf.kernels.merge as m; "
                 "print(kernels.__file__); print(m.__file__)")
    assert r.returncode == 0, r.stderr
    hf, ours = r.stdout.split()
    assert not Path(hf).resolve().is_relative_to(ROOT), hf  # Hugging Face's package, not our folder
    assert Path(ours).resolve().is_relative_to(ROOT / "kernels")
    r = _at_root("-m", "flashforge_hf", "--help")
    assert r.returncode == 0 and "usage: flashforge-hf" in r.stdout, r.stderr


def test_our_kernels_import_from_the_repo_root():
    r = _at_root("-c", "import flashforge_hf.kernels.suffix_attention as s; print(s.__file__)")
    assert r.returncode == 0 and Path(r.stdout.strip()).resolve().is_relative_to(ROOT / "kernels"), r.stderr
