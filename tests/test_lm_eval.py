"""lm-evaluation-harness through ``flashforge-hf lm-eval``: the shipped GSM8K 8-shot CoT task
(examples/lm_eval/gsm8k_cot_local.yaml) on a tiny model, flashforge against sdpa. lm-eval calls plain
``model.generate``, so every generation batch it sends must build a PrefixSharingCache that shares the prefix."""

import json
from pathlib import Path

import pytest

from flashforge_hf import cli
from flashforge_hf.cache import PrefixSharingCache

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

ROOT = Path(__file__).resolve().parents[1]
LIMIT, BATCH = 8, 4


def _run(attn: str, model: str, out: Path) -> tuple[dict, list[dict]]:
    """lm-eval's CLI on the local task; returns (gsm8k_cot_local's metrics, its logged samples by doc id)."""
    cli.main(["lm-eval", "run", "--model", "hf", "--model_args",
              f"pretrained={model},attn_implementation={attn},dtype=float32", "--device", "cpu",
              "--include_path", str(ROOT / "examples" / "lm_eval"), "--tasks", "gsm8k_cot_local",
              "--limit", str(LIMIT), "--batch_size", str(BATCH), "--gen_kwargs", "max_gen_toks=6",
              "--log_samples", "--output_path", str(out)])
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["gsm8k_cot_local"]
    samples = [json.loads(line) for line in next(out.rglob("samples_gsm8k_cot_local_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: (s["doc_id"], s["filter"]))  # one line per doc and filter


def test_lm_eval_gsm8k_cot_flashforge_equals_sdpa(tmp_path, monkeypatch):
    from tiny import save_tiny_chat_model

    monkeypatch.chdir(ROOT)  # the task's data_files are relative to the repo root
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    built = []
    init = PrefixSharingCache.__init__
    monkeypatch.setattr(PrefixSharingCache, "__init__", lambda self, *a, **k: (init(self, *a, **k), built.append(self))[0])
    model = save_tiny_chat_model(tmp_path / "model")
    stock, stock_samples = _run("sdpa", model, tmp_path / "sdpa")
    assert not built
    ours, our_samples = _run("flashforge", model, tmp_path / "flashforge")
    assert {s["doc_id"] for s in our_samples} == set(range(LIMIT))
    assert [s["resps"] for s in our_samples] == [s["resps"] for s in stock_samples]  # identical generations
    assert {k: v for k, v in ours.items() if "exact_match" in k} == {k: v for k, v in stock.items() if "exact_match" in k}
    assert len(built) == LIMIT // BATCH  # one cache per generation batch lm-eval sent
    assert all(c.num_rows == BATCH and len(c.forest.seg_tokens) >= 1 and sum(map(len, c.forest.seg_tokens)) > 300
               for c in built)  # the 8-shot prefix stored once per batch
