"""The attention benchmark (flashforge_bench.attention, benchmarks/attention.py) on the CPU: the FlashInfer paths
say "not installed" without FlashInfer, FlashInfer's paged layout holds the layer's values, the floors take both
ceilings, and the results (CSV, markdown) carry the FlashInfer columns. Timing itself needs CUDA."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch

from flashforge_bench import attention as ba
from flashforge_bench.harness import floor_terms
from flashforge_hf.ceilings import Ceilings

CEILINGS = Ceilings("test card", bandwidth=2e12, matmul_flops=5e14, tile_flops=4e14, source="table")


def _layer(case):
    return ba.make_layer(case, torch.Generator().manual_seed(0), "cpu")


def test_floor_has_both_terms():
    case = ba.shared_case(4, 64, 20)
    assert case.nbytes() == (64 + 4 * 20) * ba.HKV * ba.D * 4 + 2 * 4 * ba.HQ * ba.D * 2
    assert case.flops() == 4 * 4 * ba.HQ * (64 + 20) * ba.D
    f = floor_terms(CEILINGS, case.nbytes(), case.flops())
    assert f["floor_bytes"] == pytest.approx(case.nbytes() / 2e12 * 1e6)
    assert f["floor_flops"] == pytest.approx(case.flops() / 5e14 * 1e6)
    assert f["floor"] == max(f["floor_bytes"], f["floor_flops"])


@pytest.mark.parametrize("case", [ba.shared_case(3, 32, 20), ba.tree_case(system=16, docs=2, doc_len=32,
                                                                           rows_per_doc=2, suffix=5),
                                  ba.distinct_case(rows=3, prefix=16, suffix=16)], ids=lambda c: c.name)
def test_page_layout_holds_every_rows_keys_and_values(case):
    """Row r's pages under each table, read back, are its path's K/V then its suffix's (full), the same after
    the shared first segment (rest), and the shared segment (shared); the shared tensors are that segment."""
    layer = _layer(case)
    paged, tables = ba.page_layout(layer)
    assert paged.kv.shape[1:] == (2, ba.HKV, ba.PAGE, ba.D) and paged.kv.dtype == ba.DTYPE
    assert torch.equal(paged.q, layer.q[:, :, 0])

    def read(table, n):  # [n requests] of (k, v) [Hkv, tokens, D]
        indptr, indices, last = (t.tolist() for t in table)
        out = []
        for i in range(n):
            pages = paged.kv[indices[indptr[i]:indptr[i + 1]]]  # [p, 2, Hkv, PAGE, D]
            kv = pages.permute(1, 2, 0, 3, 4).reshape(2, ba.HKV, -1, ba.D)
            out.append(kv[:, :, : kv.shape[2] - ba.PAGE + last[i]])
        return out

    B = len(layer.paths)
    for skip, table in ((0, tables.full), (1, tables.rest)):
        if table is None:
            continue
        for r, (got, path) in enumerate(zip(read(table, B), layer.paths)):
            k, v = layer.path_kv(path[skip:]) if path[skip:] else (layer.suf_k[r][:, :0],) * 2
            assert torch.equal(got[0], torch.cat([k, layer.suf_k[r]], 1))
            assert torch.equal(got[1], torch.cat([v, layer.suf_v[r]], 1))
    shared = len({p[0] for p in layer.paths}) == 1
    assert (tables.shared is not None) == shared and (paged.k_shared is not None) == shared
    if shared:
        k, v = layer.path_kv([layer.paths[0][0]])
        (got,) = read(tables.shared, 1)
        assert torch.equal(got[0], k) and torch.equal(got[1], v)
        assert torch.equal(paged.k_shared, k) and torch.equal(paged.v_shared, v)


def test_worst_err_keeps_a_nan_wherever_it_comes():
    """A path's check takes the worse of its eager and graph outputs: a NaN in either fails it."""
    nan = float("nan")
    assert ba.worst_err([1e-3, 2e-3]) == 2e-3
    assert all(not ba.worst_err(e) <= ba.TOLERANCE for e in ([1e-3, nan], [nan, 1e-3]))


def test_page_layout_refuses_segments_of_partial_pages():
    with pytest.raises(ValueError, match="whole pages"):
        ba.page_layout(_layer(ba.shared_case(2, ba.PAGE + 1, 4)))


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is not None, reason="FlashInfer is installed here")
def test_without_flashinfer_its_columns_say_not_installed(tmp_path):
    fi, why = ba.import_flashinfer()
    assert fi is None and "flashinfer" in why
    case = ba.shared_case(4, 64, 20)
    layer = _layer(case)
    ref = ba.reference(layer)
    floor = floor_terms(CEILINGS, case.nbytes(), case.flops())
    base = dict(case=case.name, batch=4, prefix=64, suffix=20, floor_us=floor["floor"],
                floor_bytes_us=floor["floor_bytes"], floor_flops_us=floor["floor_flops"])
    fi_rows = ba.flashinfer_rows(layer, ref, base, 10, None, 1, set())
    assert [r["method"] for r in fi_rows] == list(ba.FLASHINFER_PATHS)
    assert all(r["status"] == "not installed" and "eager_us" not in r for r in fi_rows)
    # ours and SDPA as the GPU run would time them (numbers made up here), then the table and CSV
    timed = dict(status="ok", rel_err=1e-3, loop_us=9.0, segment_tasks=1, block_m=16, suffix_splits=1)
    rows = [dict(base, method="ours", eager_us=4.0, graph_us=2.0, make_plan_us=30.0, replan_us=3.0, **timed),
            dict(base, method="ours-private", eager_us=6.0, graph_us=5.0, **timed),
            dict(base, method="sdpa", eager_us=8.0, graph_us=7.0, **timed)] + fi_rows
    ba.finish_case(rows)
    ours = rows[0]
    assert ours["fi_fastest"] == "not installed" and "fi_fastest_over_ours_graph" not in ours
    assert ours["graph_over_floor"] == pytest.approx(2.0 / floor["floor"]) and ours["speedup_vs_sdpa_eager"] == 2.0
    stem = str(tmp_path / "attention_test")
    host = {"one suffix split": 12.0}
    def write(cases_total):
        if importlib.util.find_spec("matplotlib") is None:
            with pytest.raises(ImportError, match="matplotlib"):
                ba.write_results(rows, host, stem, "test", "abc", "test card", CEILINGS, cases_total)
        else:
            ba.write_results(rows, host, stem, "test", "abc", "test card", CEILINGS, cases_total)
            assert (tmp_path / "attention_test.png").stat().st_size > 0
        return (tmp_path / "attention_test.md").read_text()

    # a run stopped after its first of two cases says so; a whole run does not
    assert "cases measured: 1 of 2 (the run stopped before the others)" in write(2)
    assert "cases measured" not in write(1)
    with open(stem + ".csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["card", "date", "commit"] + ba.COLUMNS
    for col in ("status", "floor_bytes_us", "floor_flops_us", "fi_fastest", "fi_fastest_graph_us",
                "fi_fastest_over_ours_graph"):
        assert col in ba.COLUMNS
    assert {r["method"]: r["status"] for r in got}["fi-cascade"] == "not installed"
    assert all(r["eager_us"] == "" for r in got if r["method"].startswith("fi-"))
    md = (tmp_path / "attention_test.md").read_text()
    assert "2.00 TB/s" in md and "500 TFLOP/s" in md and "(test card, table)" in md
    table = md.split("## FlashInfer, same inputs and timer")[1].split("##")[0]
    assert "fastest FlashInfer / ours (graph)" in table
    (row,) = [line for line in table.splitlines() if line.startswith(f"| {case.name} |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:2 + len(ba.FLASHINFER_PATHS)] == ["not installed"] * len(ba.FLASHINFER_PATHS)
    assert cells[-2:] == ["not installed", ""]
