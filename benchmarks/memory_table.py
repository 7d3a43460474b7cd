"""Client peak memory of FedAvg, FedLoRA, SplitFed and MU-SplitFed: OPT-1.3B and what fits here.

Prints (numbers recorded in docs/memory.md):

1. OPT-1.3B accounted on the meta device at the paper's setting as we read it (SST-2,
   batch 32, sequence length 32, fp32, plain SGD), cuts 2, 4, 8, 12, 16;
2. the same in fp16, and at batch 8 (DeComFL's default batch) in fp32;
3. measured peaks of real CPU steps (fresh subprocess, peak RSS growth) for an
   opt-125m-shaped model at cut 2, batch 16, length 32, next to the accounted peak;
4. with ``--measure-13b METHODS``: measured peaks of real OPT-1.3B client steps (cut 2,
   length 32, batch ``--batch-13b``, default 32) for the comma-separated methods. Building
   the random 1.3B model needs ~6 GB of RAM; FedAvg's step needs ~11 GB and, on 2 cores,
   minutes per step at batch 8.

Usage: ``python benchmarks/memory_table.py [--quick] [--threads N]
[--measure-13b mu_splitfed,fedlora,fedavg --batch-13b 8]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from simulator.measure.memory import StepSetting, account, measure_rss, memory_table  # noqa: E402

PAPER_GB = {"fedavg": 8.02, "fedlora": 5.64, "mu_splitfed": 1.05}
CUTS = (2, 4, 8, 12, 16)
GB = 1e9


def _gb(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in out.columns:
        if col.endswith("_bytes"):
            out[col.replace("_bytes", "_GB")] = out.pop(col) / GB
    return out


def opt13b(batch: int, seq_len: int, dtype: str, cuts=CUTS) -> pd.DataFrame:
    """Accounted rows: fedavg and fedlora once (they hold the whole model), split ones per cut."""
    rows = []
    whole = memory_table("opt-1.3b", cut=cuts[0], batch=batch, seq_len=seq_len, dtype=dtype,
                         measure=False, methods=["fedavg", "fedlora"])
    whole.insert(1, "cut", "-")
    rows.append(whole)
    for cut in cuts:
        df = memory_table("opt-1.3b", cut=cut, batch=batch, seq_len=seq_len, dtype=dtype,
                          measure=False, methods=["splitfed", "mu_splitfed"])
        df.insert(1, "cut", cut)
        rows.append(df)
    out = pd.concat(rows, ignore_index=True).drop(columns=["measured_peak_bytes"])
    out["paper_GB"] = out["method"].map(PAPER_GB)
    return _gb(out)


def measured_small(kind: str, batch: int, seq_len: int) -> pd.DataFrame:
    df = memory_table(kind, cut=2, batch=batch, seq_len=seq_len, measure=True, how="rss")
    df["measured/peak"] = df["measured_peak_bytes"] / df["peak_bytes"]
    return _gb(df)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only cut 2 and no fp16/batch-8 tables")
    ap.add_argument("--measure-13b", default="",
                    help="comma-separated methods to measure on real OPT-1.3B steps (cut 2)")
    ap.add_argument("--batch-13b", type=int, default=32)
    ap.add_argument("--skip-tables", action="store_true", help="only the --measure-13b part")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 200)
    pd.set_option("display.float_format", lambda v: f"{v:.3f}")
    cuts = (2,) if args.quick else CUTS

    if not args.skip_tables:
        tables(args, cuts)
    for method in [m for m in args.measure_13b.split(",") if m]:
        t = time.perf_counter()
        s = StepSetting("opt-1.3b", cut=2, batch=args.batch_13b, seq_len=32)
        acc = account(method, s)
        rss = measure_rss(method, s, threads=args.threads)
        print(f"\n== OPT-1.3B {method} client, cut 2, B={args.batch_13b}, L=32, fp32: real CPU step")
        print(f"accounted total {acc['total_bytes'] / GB:.3f} GB, accounted peak "
              f"{acc['peak_bytes'] / GB:.3f} GB, measured {rss / GB:.3f} GB "
              f"(paper: {PAPER_GB.get(method, float('nan'))} GB)  [{time.perf_counter() - t:.0f} s]",
              flush=True)


def tables(args: argparse.Namespace, cuts) -> None:
    t = time.perf_counter()
    print("== OPT-1.3B, accounted on meta: SST-2 setting B=32, L=32, fp32, SGD (GB = 1e9 bytes)")
    print(opt13b(32, 32, "float32", cuts).to_string(index=False))
    if not args.quick:
        print("\n== OPT-1.3B, accounted: B=32, L=32, fp16")
        print(opt13b(32, 32, "float16", cuts).to_string(index=False))
        print("\n== OPT-1.3B, accounted: B=8, L=32, fp32 (DeComFL's default batch)")
        print(opt13b(8, 32, "float32", cuts).to_string(index=False))
    print(f"[accounting took {time.perf_counter() - t:.0f} s]")

    t = time.perf_counter()
    print("\n== opt-125m shapes, cut 2, B=16, L=32, fp32: measured on this CPU (peak RSS growth"
          " of a real step in a fresh process) next to the accounted peak")
    print(measured_small("opt-125m", 16, 32).to_string(index=False))
    print(f"[measuring took {time.perf_counter() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
