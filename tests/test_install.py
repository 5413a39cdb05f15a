"""The checkout works as users run it: from the repo root, with Hugging Face's `kernels` package installed
(transformers >= 5.25 depends on it), our top-level kernels/ and benchmarks/ folders shadow nothing, and the
benchmarks run as the installed package flashforge_bench and as scripts."""

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


def test_benchmarks_folder_is_the_flashforge_bench_package():
    """benchmarks/ installs as flashforge_bench (pyproject.toml's package-dir), without an __init__.py: from the
    repo root it must not be a regular package "benchmarks"; the library itself holds no benchmark module."""
    assert not (ROOT / "benchmarks" / "__init__.py").exists()
    assert not list((ROOT / "flashforge_hf").glob("bench*.py"))
    r = _at_root("-c", "import flashforge_bench.harness as h, flashforge_bench.attention as a; print(h.__file__)")
    assert r.returncode == 0 and Path(r.stdout.strip()).resolve().is_relative_to(ROOT / "benchmarks"), r.stderr


def test_benchmark_scripts_run_from_the_repo_root(tmp_path):
    for script in ("attention", "generate", "generate_sweep"):
        r = _at_root(f"benchmarks/{script}.py", "--help")
        assert r.returncode == 0 and "usage: flashforge-hf bench" in r.stdout, r.stderr
