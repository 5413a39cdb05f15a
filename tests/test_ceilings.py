"""The card's ceilings: table values for known cards, one measurement (kept on disk) for others."""

import json

import pytest
import torch

from flashforge_hf import ceilings
from flashforge_hf.ceilings import Ceilings


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHFORGE_HF_CACHE", str(tmp_path))
    ceilings._cuda_ceilings.cache_clear()
    yield tmp_path
    ceilings._cuda_ceilings.cache_clear()


def test_known_card_comes_from_the_table(fresh, monkeypatch):
    monkeypatch.setattr(ceilings, "measure", lambda device: pytest.fail("a known card must not be measured"))
    (name, sms), (bw, mm, tiles) = next(iter(ceilings.MEASURED.items()))
    c = ceilings._cuda_ceilings(name, sms, 0)
    assert (c.card, c.bandwidth, c.matmul_flops, c.tile_flops, c.source) == (name, bw, mm, tiles, "table")


def test_other_card_is_measured_once_and_cached_on_disk(fresh, monkeypatch):
    calls = []

    def fake_measure(device):
        calls.append(device)
        return Ceilings("Card X", 1e12, 2e14, 1e14, source="measured")

    monkeypatch.setattr(ceilings, "measure", fake_measure)
    first = ceilings._cuda_ceilings("Card X", 7, 0)
    assert len(calls) == 1 and first.source == "measured"
    stored = json.loads((fresh / "ceilings.json").read_text())
    assert stored["Card X (7 SMs)"]["bandwidth"] == 1e12
    ceilings._cuda_ceilings.cache_clear()  # a new process: read from disk, not measured again
    assert ceilings._cuda_ceilings("Card X", 7, 0) == first and len(calls) == 1
    # Another multiprocessor count is another device type.
    ceilings._cuda_ceilings("Card X", 8, 0)
    assert len(calls) == 2


def test_floor_terms():
    c = Ceilings("c", bandwidth=2e12, matmul_flops=4e14, tile_flops=1e14, source="table")
    assert c.floor_s(4e6, 8e8) == pytest.approx((2e-6, 2e-6))
    assert c.floor_s(4e6, 8e8, tiles=True) == pytest.approx((2e-6, 8e-6))
    assert "2.00 TB/s" in c.describe() and "400 TFLOP/s" in c.describe()


def test_cpu_is_measured():
    c = ceilings.ceilings_for("cpu")
    assert c.source == "measured" and c.card == "CPU"
    assert 1e8 < c.bandwidth < 1e13 and 1e8 < c.matmul_flops < 1e14 and c.tile_flops == c.matmul_flops
    assert ceilings.ceilings_for(torch.device("cpu")) is c  # once per process


def test_out_of_memory_while_measuring_falls_back_loudly(fresh, monkeypatch):
    def oom(device):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(ceilings, "measure", oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.warns(UserWarning, match="ran out of GPU memory"):
        c = ceilings._cuda_ceilings("Card Y", 66, 0)
    bw, mm, tiles = ceilings.MEASURED[ceilings.REFERENCE]
    assert c.source == "estimated" and c.bandwidth == pytest.approx(bw / 2) and c.tile_flops == pytest.approx(tiles / 2)
    assert not (fresh / "ceilings.json").exists()  # an estimate is never stored as a measurement
