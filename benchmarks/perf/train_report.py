"""Markdown table of trainer runs from their manifest.json files (stdlib only).

usage: train_report.py RUNS_DIR METHOD...
"""
import json
import sys
from pathlib import Path

runs = Path(sys.argv[1])
rows = []
for m in sys.argv[2:]:
    man = json.loads((runs / m / "manifest.json").read_text())
    seen = [u["seen"] for u in man["units"]]
    ex = sum(s["examples"] for s in seen)
    tok = sum(s["tokens"] for s in seen)
    wall = man["wall_seconds"]
    steps = man["resolved"]["optimizer_steps"]
    rows.append((m, steps, ex, tok, wall, tok / wall, wall / max(steps, 1), 1000 * wall / ex))
base = next((r for r in rows if r[0] == "lora-k"), None)
print(f"device {man['device']} / {man['dtype']}, model {man['model']['source']}, {man['code_version']}")
print()
print("| method | steps | examples seen | tokens seen | wall s | tokens/s | s per step | s per 1000 examples | vs lora-k per example |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    ratio = f"{r[7] / base[7]:.2f}x" if base else "-"
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.0f} | {r[6]:.2f} | {r[7]:.1f} | {ratio} |")
