"""benchmarks/kernel_resources.py: the kernels compile for sm_90 on a machine without a GPU, their resource usage is
read off the compiled code, and the occupancy arithmetic (what fits on one Hopper multiprocessor) is right."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flashforge_bench import kernel_resources as kr


def _res(regs, shared, threads=128):
    return kr.Resources("k", "c", regs, 0, shared, threads, 0)


def test_occupancy_arithmetic():
    # registers go per warp in units of 256: 255 registers x 32 threads -> 8,160 -> 8,192 per warp
    assert _res(255, 0).regs_per_program() == 4 * 8192
    assert _res(64, 0).regs_per_program() == 4 * 2048
    assert kr.resident(_res(255, 0)) == 2  # 65,536 registers
    assert kr.resident(_res(32, 0)) == 16  # 2,048 threads
    assert kr.resident(_res(32, 100 * 1024)) == 2  # 228 KB shared, 1 KB reserved per program
    assert kr.resident(_res(32, 0, threads=32)) == 32  # 32 programs
    big = _res(255, 48 * 1024)
    assert kr.resident(_res(234, 13 * 1024), [big]) == 1
    assert kr.resident(_res(234, 13 * 1024), [big, big]) == 0
    assert not kr.fits([big, big, _res(16, 0)])


def test_report_compiles_for_sm90_without_a_gpu():
    code = ("import json; from flashforge_bench import kernel_resources as kr; "
            "print(json.dumps([kr.segment(64).row(), kr.suffix().row(), kr.merge().row()]))")
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in rows] == ["segment", "suffix", "merge"]
    for r in rows:
        assert 16 <= r["regs"] <= 255 and r["stack"] >= 0 and r["threads"] in (32, 64, 128, 256) and r["per_sm"] >= 1, r
    assert rows[0]["shared"] > 0 and rows[1]["shared"] > 0  # the key/value tiles are staged in shared memory
    # compiled as launched (16-byte aligned pointers): the key/value loads are pipelined with asynchronous copies;
    # compiled without the alignment, the same kernels load synchronously and report other registers and shared memory
    assert rows[0]["async_loads"] > 0 and rows[1]["async_loads"] > 0, rows


def test_report_refuses_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=0"):
        kr.merge()
