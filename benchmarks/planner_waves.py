"""The planner's waves (segment tasks per SM): forest attention (segment, suffix and merge kernels) of one layer
per case with every plan aiming at one wave, at two waves, and with the planner's choice, graph-replay median over
rotated input copies. Writes benchmarks/results/planner_waves_<card>.md.

    python benchmarks/planner_waves.py [--commit SHA]
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from flashforge_bench import attention as ba
from flashforge_bench.harness import card_name, git_commit, n_copies, time_calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = ba.CASES + [ba.shared_case(256, 650, 192), ba.shared_case(64, 4096, 64)]
    rows = []
    for case in cases:
        layer = ba.make_layer(case, gen, "cuda")
        row = {"case": case.name}
        for label, waves in (("one wave", (1,)), ("two waves", (2,)), ("planner's choice", ba.FF.planner.WAVES)):
            with ba.patched(ba.FF.planner, WAVES=waves):
                calls, plan, _ = ba.ours_calls(layer, n_copies(case.unique_kv_tokens() * ba.HKV * ba.D * 4))
                row[label] = round(time_calls(calls, 60)["graph_us"], 2)
                row[label + " slots/row"] = int(plan.row_slot_off[1]) if plan.segments is not None else 0
        print(json.dumps(row), flush=True)
        rows.append(row)
        del layer
        torch.cuda.empty_cache()
    card, slug = card_name(torch.device("cuda"))
    commit = args.commit or git_commit()
    labels = ("one wave", "two waves", "planner's choice")
    lines = [f"# Planner waves: one, two, the planner's choice ({card})", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
             f"`python {' '.join(sys.argv)}`", "",
             "One layer's forest attention (32 query / 8 KV heads, D=128, bf16), graph-replay median in us; "
             "slots/row: segment partials per row.", "",
             "| case | " + " | ".join(f"{x} | slots/row" for x in labels) + " |", "|---" * 7 + "|"]
    lines += ["| " + " | ".join([r["case"]] + [f"{r[x]} | {r[x + ' slots/row']}" for x in labels]) + " |"
              for r in rows]
    path = Path(args.out_dir) / f"planner_waves_{slug}.md"
    path.write_text("\n".join(lines) + "\n")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
