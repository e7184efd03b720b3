"""Where a study's time went: one row per finished cell of a results store (training and
evaluation seconds from each cell's `cell.json`; of the evaluation, the scoring seconds from the
cell's `work/<key>/eval/results.json` while it exists, the rest being model and data loading),
in finishing order, with totals, then the hours per part (selection or grid) and method, as
Markdown.

Training seconds are the training run's own wall time over every process that worked on it
(`info.training.train_wall_seconds`: a run resumed in a later session counts whole), counted
once per run (a configuration under one code version): a run shared by two cells (`meta-lora`
and its `meta-lora+tta` sibling, or a grid cell reusing its selection candidate's run on the
same binary) is counted on the first cell that finished and shown as "shared" on the others.
Cells without the training facts fall back to `info.train_seconds` (their last process's time). With one compute thread per worker, a worker's wall seconds are
its core's seconds.

  python study_times.py STORE
"""

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

store = Path(sys.argv[1])
cells = []
for f in (store / "cells").glob("*/cell.json"):
    d = json.loads(f.read_text())
    cells.append(d)
cells.sort(key=lambda d: d.get("info", {}).get("finished_at_unix", 0))

seen_runs = set()
rows = []
for d in cells:
    c, info = d["cell"], d.get("info", {})
    k = c["k"] if c["k"] is not None else ("0" if c["method"] == "base" else "full")
    part = "selection" if c["experiment"].endswith("/selection") else "grid"
    training = info.get("training") or {}
    wall = training.get("train_wall_seconds")
    if wall is None:
        wall = info.get("train_seconds", 0.0)
    # One training run per configuration (meta-lora and meta-lora+tta share theirs, so the two
    # count as one method here; a grid cell reuses its selection candidate's): counted on the
    # first finisher. Other methods never share: stage2-only's configuration can equal a
    # meta-lora or lora-k candidate's in every other key (it carries the unused inner settings).
    cfg = dict(training.get("config") or {})
    if cfg.get("method") == "meta-lora+tta":
        cfg["method"] = "meta-lora"
    # A run is one configuration under one code version: a grid on another binary than its
    # selection trains its own runs even where the configurations agree.
    run_id = json.dumps([cfg, info.get("code_version")], sort_keys=True) if cfg else None
    shared = run_id is not None and run_id in seen_runs
    if run_id is not None:
        seen_runs.add(run_id)
    res = store / "work" / c["key"] / "eval" / "results.json"
    scoring = json.loads(res.read_text())["seconds"] if res.exists() else math.nan
    cand = c.get("candidate")
    name = f"{c['method']} K={k} seed {c['seed']}"
    if cand:
        name += " [" + " ".join(f"{a}={b}" for a, b in sorted(cand.items())) + "]"
    rows.append(
        {
            "name": name,
            "part": part,
            "method": c["method"],
            "train": 0.0 if shared else wall,
            "shared": shared,
            "eval": info.get("eval_seconds", 0.0),
            "scoring": scoring,
        }
    )

print("| cell | part | train s | eval s | of which scoring s | total s |")
print("|---|---|---:|---:|---:|---:|")
for r in rows:
    t = "shared" if r["shared"] else f"{r['train']:.0f}"
    sc = "" if math.isnan(r["scoring"]) else f"{r['scoring']:.0f}"
    print(f"| {r['name']} | {r['part']} | {t} | {r['eval']:.0f} | {sc} | {r['train'] + r['eval']:.0f} |")
tt = sum(r["train"] for r in rows)
te = sum(r["eval"] for r in rows)
print(f"| **{len(rows)} cells** | | **{tt:.0f}** | **{te:.0f}** | | **{tt + te:.0f}** |")
if tt + te > 0:
    print(
        f"\nTraining {100 * tt / (tt + te):.0f}% of the cells' time, evaluation "
        f"{100 * te / (tt + te):.0f}%."
    )

by = defaultdict(lambda: [0, 0.0, 0.0])
for r in rows:
    b = by[(r["part"], r["method"])]
    b[0] += 1
    b[1] += r["train"]
    b[2] += r["eval"]
print("\n| part | method | cells | train h | eval h | total h |")
print("|---|---|---:|---:|---:|---:|")
for (part, method), (n, t, e) in sorted(by.items()):
    print(f"| {part} | {method} | {n} | {t / 3600:.2f} | {e / 3600:.2f} | {(t + e) / 3600:.2f} |")
print(f"| **all** | | **{len(rows)}** | **{tt / 3600:.2f}** | **{te / 3600:.2f}** | **{(tt + te) / 3600:.2f}** |")
