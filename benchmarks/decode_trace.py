"""Where a compiled FlashForge decode step's time goes inside a real generate (not a replay in isolation): the
GPU interval between consecutive steps, the SM clock and board power every 16 steps, and a kernel trace of six
steps at the middle of the generation (busy kernel time vs span, costliest kernels). Random-weight Llama-3-8B,
the workloads of benchmarks/generate.py, ``flashforge_hf.generate(..., compile=True)``; needs CUDA (clock and
power through pynvml, as torch.cuda.clock_rate reads them).

    python benchmarks/decode_trace.py --workloads few-shot-8b doc-qa-4k [--commit SHA]

Writes benchmarks/results/decode_trace_<card>.md (and .json).
"""
import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import LogitsProcessorList

import flashforge_hf
from flashforge_bench import generate as be
from flashforge_bench.harness import card_name, git_commit, random_model
from flashforge_hf.comparison import StepClock

TRACED = 6  # decode steps in the kernel trace


class _Probe(StepClock):
    """The step clock of flashforge_hf.comparison (a CUDA event per decode step), plus every 16 steps the SM clock (MHz)
    and power (W); starts and stops ``prof`` around steps [lo, lo + TRACED)."""

    def __init__(self, prof, lo):
        super().__init__(torch.device("cuda"))
        self.clocks, self.prof, self.lo = [], prof, lo

    def __call__(self, input_ids, scores):
        n = len(self.marks)
        super().__call__(input_ids, scores)
        if n % 16 == 0:
            self.clocks.append((n, torch.cuda.clock_rate(), round(torch.cuda.power_draw() / 1000)))
        if n == self.lo:
            self.prof.start()
        if n == self.lo + TRACED:
            self.prof.stop()
        return scores


def trace(model, wl, min_new: bool) -> dict:
    ids, mask = wl.batch(model.config.vocab_size, torch.device("cuda"))
    kw = wl.generate_kwargs() if min_new else dict(wl.generate_kwargs(), min_new_tokens=None)
    flashforge_hf.generate(model, ids, mask, compile=True, progress=False, **dict(kw, max_new_tokens=2, min_new_tokens=2))
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    probe = _Probe(prof, wl.new_tokens // 2)
    torch.cuda.synchronize()
    flashforge_hf.generate(model, ids, mask, compile=True, progress=False,
                           logits_processor=LogitsProcessorList([probe]), **kw)
    torch.cuda.synchronize()
    steps = [a.elapsed_time(b) for a, b in zip(probe.marks, probe.marks[1:])]
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) / 1e3 / TRACED
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / TRACED
    per_name: dict = {}
    for e in kernels:
        per_name[e.name[:60]] = per_name.get(e.name[:60], 0.0) + e.time_range.elapsed_us() / 1e3 / TRACED
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:10]
    return dict(workload=wl.name, rows=wl.rows, min_new_tokens=min_new, tpot_median_ms=statistics.median(steps),
                first_steps_ms=[round(s, 2) for s in steps[:4]], every_16th_step_ms=[round(s, 2) for s in steps[::16]],
                clock_mhz_power_w=probe.clocks, traced_span_ms=span, traced_busy_ms=busy,
                top_kernels_ms=[(n, round(ms, 3)) for n, ms in top])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["few-shot-8b", "doc-qa-4k"], choices=list(be.WORKLOADS))
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda")
    card, tag = card_name(device)
    model = random_model("llama-8b", device, torch.bfloat16)
    results = []
    for name in args.workloads:
        for min_new in (True, False):
            r = trace(model, be.WORKLOADS[name], min_new)
            print(json.dumps(r), flush=True)
            results.append(r)
        be.free_memory()
    stamp = (f"{card}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
             f"{args.commit or git_commit()}, `python benchmarks/decode_trace.py {' '.join(sys.argv[1:])}`")
    lines = ["# Compiled decode steps inside a real generate", "", stamp, "",
             "min_new_tokens: the benchmark's setting (every row generates new_tokens; transformers then adds its "
             "MinNewTokensLength processor, which the decode loop runs in place since d3a3d2a: EOS scores set to -inf, "
             "where transformers' own copies and rewrites the float32 logits each step); off: the same without it. "
             "TPOT: median GPU interval between steps. Trace: six steps at the middle.", "",
             "| workload | rows | min_new_tokens | TPOT ms | first steps ms | every 16th step ms | SM MHz / W every 16 steps | traced span / busy ms per step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        clocks = " ".join(f"{c}/{w}" for _, c, w in r["clock_mhz_power_w"])
        lines.append(f"| {r['workload']} | {r['rows']} | {'on' if r['min_new_tokens'] else 'off'} | "
                     f"{r['tpot_median_ms']:.2f} | {r['first_steps_ms']} | {r['every_16th_step_ms']} | {clocks} | "
                     f"{r['traced_span_ms']:.2f} / {r['traced_busy_ms']:.2f} |")
    for r in results:
        lines += ["", f"{r['workload']}, min_new_tokens {'on' if r['min_new_tokens'] else 'off'}: costliest kernels "
                  "(ms per step): " + "; ".join(f"{n} {ms}" for n, ms in r["top_kernels_ms"])]
    out = Path(args.out_dir) / f"decode_trace_{tag}"
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("wrote", out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
