"""The planner's waves (segment tasks per SM) on the H100: forest attention (segment, suffix and merge kernels)
of one layer per case, with WAVES=(2,) (every plan aims at two waves) against the planner's choice of
one or two, graph-replay median over rotated input copies. Writes benchmarks/results/planner_waves_<card>.md.

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
        for label, waves in (("two waves", (2,)), ("planner's choice", ba.FF.planner.WAVES), ("two waves again", (2,))):
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
    lines = [f"# Planner waves: two vs the planner's choice ({card})", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
             f"`python {' '.join(sys.argv)}`", "",
             "One layer's forest attention (32 query / 8 KV heads, D=128, bf16), graph-replay median in us; "
             "slots/row: segment partials per row.", "",
             "| case | two waves | slots/row | planner's choice | slots/row | two waves again |", "|---|---|---|---|---|---|"]
    two, mine = "two waves", "planner's choice"
    lines += [f"| {r['case']} | {r[two]} | {r[two + ' slots/row']} | {r[mine]} | {r[mine + ' slots/row']} | "
              f"{r[two + ' again']} |" for r in rows]
    path = Path(args.out_dir) / f"planner_waves_{slug}.md"
    path.write_text("\n".join(lines) + "\n")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
