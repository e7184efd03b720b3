"""The peer of `mlbench compare` for the store benchmark: the obvious polars code a user would
write for the same table (mean over seeds and a t interval per method x K x task x language,
newest run of each cell), reading the store's Parquet files with a glob. No paired tests.

  python store_peer.py STORE
"""

import sys

import polars as pl

store = sys.argv[1]
m = pl.concat(
    [
        pl.scan_parquet(f"{store}/{g}")
        for g in ("cells/*/metrics.parquet", "parts/metrics-*.parquet")
        if list(__import__("glob").glob(f"{store}/{g}"))
    ]
).filter(pl.col("metric") == "acc")
cell = ["experiment", "method", "k", "seed"]
newest = m.group_by(cell).agg(pl.col("finished_at_unix").max())
t = (
    m.join(newest, on=cell + ["finished_at_unix"], nulls_equal=True)
    .group_by(["method", "k", "task", "lang"])
    .agg(
        mean=pl.col("value").mean(),
        sd=pl.col("value").std(),
        n=pl.len(),
    )
    .with_columns(half=1.96 * pl.col("sd") / pl.col("n").sqrt())
    .sort(["method", "k", "task", "lang"])
    .collect()
)
print(t.pivot(on="lang", index=["method", "k"], values="mean"))
