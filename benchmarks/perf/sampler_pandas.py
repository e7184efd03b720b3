"""The obvious pandas equivalent of `mlbench data sample --task sib200 --langs all --k 64`.

Reads the same Parquet file, keeps the train split, and draws K examples per language,
stratified by label with `groupby(...).sample`, the way a pandas user would write it
(proportional per-class sizes rounded by pandas' `frac`, so not exactly K; mlbench's counts
are exact). Prints the seconds spent after imports, and the rows drawn.
"""
import sys
import time

t_import = time.perf_counter()
import pandas as pd  # noqa: E402

t0 = time.perf_counter()
path, k = sys.argv[1], int(sys.argv[2])
df = pd.read_parquet(path)
train = df[df["split"] == "train"]
n_per_lang = train.groupby("lang")["id"].transform("size")
frac = k / n_per_lang.iloc[0]
pools = train.groupby(["lang", "label"], group_keys=False).sample(frac=frac, random_state=0)
pools = pools[["task", "lang", "id", "label"]].assign(seed=0, k=k)
pools.to_parquet("/tmp/pandas-pools.parquet")
t1 = time.perf_counter()
print(f"pandas_in_process_s={t1 - t0:.4f} import_s={t0 - t_import:.4f} rows={len(pools)}")
