"""Where a study's time went: one row per finished cell of a results store (training and
evaluation seconds from each cell's `cell.json`; of the evaluation, the scoring seconds from the
cell's `work/<key>/eval/results.json`, the rest being model and data loading), in finishing
order, with totals, as Markdown.

  python study_times.py STORE
"""

import json
import sys
from pathlib import Path

store = Path(sys.argv[1])
rows = []
for f in (store / "cells").glob("*/cell.json"):
    d = json.loads(f.read_text())
    c, info = d["cell"], d.get("info", {})
    k = c["k"] if c["k"] is not None else ("0" if c["method"] == "base" else "full")
    res = store / "work" / c["key"] / "eval" / "results.json"
    scoring = json.loads(res.read_text())["seconds"] if res.exists() else float("nan")
    rows.append(
        (
            info.get("finished_at_unix", 0),
            f"{c['method']} K={k} seed {c['seed']}",
            info.get("train_seconds", 0.0),
            info.get("eval_seconds", 0.0),
            scoring,
        )
    )
rows.sort()
print("| cell | train s | eval s | of which scoring s | total s |")
print("|---|---:|---:|---:|---:|")
for _, name, t, e, sc in rows:
    print(f"| {name} | {t:.0f} | {e:.0f} | {sc:.0f} | {t + e:.0f} |")
tt = sum(r[2] for r in rows)
te = sum(r[3] for r in rows)
ts = sum(r[4] for r in rows)
print(f"| **{len(rows)} cells** | **{tt:.0f}** | **{te:.0f}** | **{ts:.0f}** | **{tt + te:.0f}** |")
if tt + te > 0:
    print(
        f"\nTraining {100 * tt / (tt + te):.0f}% of the cells' time, evaluation "
        f"{100 * te / (tt + te):.0f}% (scoring {100 * ts / (tt + te):.0f}%, loading the rest)."
    )
