"""What each decode kernel asks of a Hopper multiprocessor, read off its compiled code without a GPU.

Compiles the segment, suffix and merge kernels for sm_90 (Triton's own ptxas; no CUDA device or driver needed)
at decode shapes (bf16, head dim 128, 4 query heads per KV head, one query token per row; every pointer 16-byte
aligned, as launched) and prints, per tile configuration: registers per thread, stack bytes (register spills),
shared memory per program, the asynchronous copies in its PTX (none: the key/value loads are not pipelined), and
how many programs of it one multiprocessor holds at once. The last columns say how many suffix programs fit beside
one or two segment programs on one multiprocessor: in a captured layer the two kernels run on two streams
(flashforge_hf/forest_attention.py), and they overlap only where both fit.

    python benchmarks/kernel_resources.py                 # the configurations tile_config picks, and a few more
    python benchmarks/kernel_resources.py --json out.json

The numbers are the compiler's (this machine's Triton; the GPU machine's may differ by version): they bound
occupancy, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashforge_bench.attention import flashforge_internals

FF = flashforge_internals()
# One Hopper multiprocessor (H100 and H200 alike): registers, shared memory (bytes; a program may use up to
# 227 KB, and the driver keeps 1 KB per resident program), threads, resident programs.
SM = dict(regs=65536, shared=233472, shared_reserved=1024, threads=2048, programs=32)
REG_UNIT = 256  # registers are allocated per warp in units of 256
G, D, DTYPE = 4, 128, "bf16"
# Pointer arguments by name: the model-dtype tensors, the float32 partials; every other *_ptr is int32.
MODEL_PTRS = {"q_ptr", "k_ptr", "v_ptr", "kn_ptr", "vn_ptr", "out_ptr"}
FP32_PTRS = {"o_ptr", "lse_ptr"}


@dataclass
class Resources:
    kernel: str
    config: str  # (BLOCK_M or BLOCK_H, BLOCK_N, num_warps, num_stages)
    regs: int  # per thread
    stack: int  # bytes per thread (spilled registers)
    shared: int  # bytes per program
    threads: int
    async_loads: int  # cp.async instructions in the PTX: > 0 where the key/value loads are software-pipelined

    @property
    def per_sm(self) -> int:
        """Programs of this kernel that one multiprocessor holds at once."""
        return resident(self)

    def row(self) -> dict:
        """The fields and ``per_sm``, as the report prints and writes them."""
        return dict(asdict(self), per_sm=self.per_sm)

    def regs_per_program(self) -> int:
        per_warp = -(-self.regs * 32 // REG_UNIT) * REG_UNIT
        return per_warp * self.threads // 32


def fits(progs: list[Resources]) -> bool:
    """Whether these programs can be resident on one multiprocessor together."""
    return (sum(p.regs_per_program() for p in progs) <= SM["regs"]
            and sum(p.shared + SM["shared_reserved"] for p in progs) <= SM["shared"]
            and sum(p.threads for p in progs) <= SM["threads"] and len(progs) <= SM["programs"])


def resident(p: Resources, beside: list[Resources] = ()) -> int:
    """How many programs ``p`` fit on one multiprocessor beside ``beside``."""
    n = 0
    while fits(list(beside) + [p] * (n + 1)):
        n += 1
    return n


def _signature(fn, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in MODEL_PTRS:
            sig[name] = f"*{DTYPE}"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    return sig


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Triton's cuobjdump is not at {path}: this report needs Triton's CUDA backend files.")
    return path


def compile_resources(kernel: str, fn, constexprs: dict, num_warps: int, num_stages: int, config) -> Resources:
    """Compile ``fn`` for sm_90 with these constexprs and options, and read its resource usage."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("The kernel resource report compiles the kernels, which Triton's interpreter does not: "
                           "run it with TRITON_INTERPRET=0 (no GPU is needed).")
    signature = _signature(fn, constexprs)
    # Every pointer 16-byte aligned, as the launchers pass them (KernelLauncher keys its variants on it, and Triton
    # specializes pointer arguments on it): without that the compiler can neither vectorize nor pipeline the loads,
    # and would report another kernel than the one that runs.
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if signature[name][0] == "*"}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=aligned)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no register count for {kernel}:\n{out}")
    return Resources(kernel, str(config), int(m.group(1)), int(m.group(2)), compiled.metadata.shared, 32 * num_warps,
                     len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", compiled.asm["ptx"])))


def segment(block_m: int, tile=None) -> Resources:
    """The segment kernel, decoding, with ``block_m`` stacked queries per tile; ``tile`` (BLOCK_N, warps, stages)
    defaults to what segment_attention.tile_config picks."""
    bn, warps, stages = tile or FF.segment_attention.tile_config(block_m, D)
    consts = dict(G=G, D=D, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_D=D, STRIDE_UNIT=16, DOT_PREC="tf32", ONE_Q=True)
    return compile_resources("segment", FF.segment_attention._segment_attention_kernel, consts, warps, stages,
                             (block_m, bn, warps, stages))


def suffix(tile=None) -> Resources:
    """The suffix kernel, decoding (a 16-query tile: one token of 4 query heads, padded), ``tile`` as above."""
    block_m = 16
    bn, warps, stages = tile or FF.suffix_attention.tile_config(block_m, D)
    consts = dict(G=G, D=D, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_D=D, STRIDE_UNIT=16, DOT_PREC="tf32")
    return compile_resources("suffix", FF.suffix_attention._suffix_attention_kernel, consts, warps, stages,
                             (block_m, bn, warps, stages))


def merge(block_h: int = 8, warps: int = 4) -> Resources:
    consts = dict(D=D, BLOCK_H=block_h, BLOCK_D=D, STRIDE_UNIT=16)
    return compile_resources("merge", FF.merge._merge_kernel, consts, warps, 1, f"({block_h} heads, {warps} warps)")


def report(segment_tiles, suffix_tiles) -> list[dict]:
    """Compile every configuration; rows with the co-residency columns (suffix programs beside one or two segment
    programs, for the default suffix tile)."""
    segs = [segment(bm, tile) for bm, tile in segment_tiles]
    sufs = [suffix(tile) for tile in suffix_tiles]
    default_suffix = sufs[0]
    rows = []
    for r in segs:
        rows.append(dict(r.row(), suffix_beside_1=resident(default_suffix, [r]),
                         suffix_beside_2=resident(default_suffix, [r, r]) if r.per_sm >= 2 else None))
    rows += [r.row() for r in sufs]
    rows.append(merge().row())
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    segment_tiles = [(64, None), (128, None), (64, (64, 4, 2)), (64, (32, 4, 2)), (128, (64, 8, 2)), (16, None)]
    suffix_tiles = [None, (64, 4, 2), (32, 8, 2), (64, 8, 3)]
    rows = report(segment_tiles, suffix_tiles)
    print(f"sm_90, triton {triton.__version__}, decode: {DTYPE}, D={D}, G={G}; one multiprocessor: {SM['regs']} "
          f"registers, {SM['shared'] // 1024} KB shared, {SM['threads']} threads")
    print(f"{'kernel':8s} {'config (M, N, warps, stages)':30s} {'regs':>5s} {'stack':>6s} {'shared':>8s} "
          f"{'threads':>7s} {'per SM':>6s} {'cp.async':>8s} {'suffix beside 1 / 2 segment':>28s}")
    for r in rows:
        two = r.get("suffix_beside_2")
        beside = "" if r["kernel"] != "segment" else f"{r['suffix_beside_1']} / {'-' if two is None else two}"
        print(f"{r['kernel']:8s} {r['config']:30s} {r['regs']:5d} {r['stack']:6d} {r['shared']:8d} {r['threads']:7d} "
              f"{r['per_sm']:6d} {r['async_loads']:8d} {beside:>28s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
