"""Writes a synthetic results store of N cells for `store.sh`, in the layout `mlbench run`
writes (cells/<key>/{cell.json, metrics.parquet, samples.parquet}): each cell is a copy of a
real cell of a template store (the README's small comparison) with its cell columns rewritten,
so schemas and row counts are those of real cells (written uncompressed, as mlbench writes
per-cell files).

  python store_synth.py TEMPLATE_STORE OUT_STORE N
"""

import json
import sys
from pathlib import Path

import polars as pl

template, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
cells = sorted(p for p in (template / "cells").iterdir() if (p / "cell.json").exists())
frames = [
    (pl.read_parquet(c / "metrics.parquet"), pl.read_parquet(c / "samples.parquet"))
    for c in cells
]
methods = ["base", "lora-full", "lora-k", "meta-lora", "meta-lora+tta"]
ks = [8, 16, 32, 64]
per_run = 100  # cells per nightly run: 5 methods x 4 budgets x 5 seeds
for i in range(n):
    run, j = divmod(i, per_run)
    method = methods[j % 5]
    k = None if method in ("base", "lora-full") else ks[(j // 5) % 4]
    seed = (j // 20) % 5
    key = f"{i:016x}"
    version = f"mlbench 0.1.0 (git {run:07d})"
    finished = 1_764_000_000 + run * 86_400 + j
    m, s = frames[i % len(frames)]
    cols = dict(
        experiment=pl.lit("bench"),
        method=pl.lit(method),
        variant=pl.lit(method),
        k=pl.lit(k, dtype=pl.Int64),
        seed=pl.lit(seed, dtype=pl.UInt64),
        key=pl.lit(key),
        code_version=pl.lit(version),
        finished_at_unix=pl.lit(finished, dtype=pl.UInt64),
    )
    d = out / "cells" / key
    d.mkdir(parents=True, exist_ok=True)
    # Uncompressed, as `mlbench run` writes per-cell files.
    m.with_columns(**cols).write_parquet(d / "metrics.parquet", compression="uncompressed")
    s.with_columns(**cols).write_parquet(d / "samples.parquet", compression="uncompressed")
    cell = {"experiment": "bench", "method": method, "k": k, "seed": seed, "key": key}
    (d / "cell.json").write_text(json.dumps({"cell": cell, "code_version": version}))
