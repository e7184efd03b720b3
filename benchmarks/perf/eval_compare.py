#!/usr/bin/env python3
"""mlbench eval vs lm-evaluation-harness (HF backend): same prompts, same examples.

Subcommands
  export        Render our task spec (datasets/tasks/<task>.toml) over our canonical Parquet in
                Python (an independent re-implementation of src/tasks.rs templates) and write
                one JSONL per task x language that the YAMLs in lm_eval_tasks/ read
                (fields: doc_id, id, lang, lang_code, context, choices, gold, raw fields).
                For XCOPA it also renders lm-eval's *stock* xcopa prompt (lm_eval.tasks.xcopa.utils)
                on the same rows and reports every difference from our spec.
  check-render  Compares the exported strings with `mlbench tasks render` (per example id).
  compare       Joins lm-eval's --log_samples jsonl with mlbench's samples.parquet by example id
                and prints accuracies, max |logprob diff|, disagreeing predictions; checks that
                lm-eval's request strings equal the exported (= our) context/continuations and
                that sha256(context)[:16] equals mlbench's prompt_sha.
  speed         Summarises the timing files written by eval_speed.sh.

Only the Python standard library, pandas and pyarrow are needed (all in the peers venv).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tomllib

# --------------------------------------------------------------------------------------------
# Template rendering: a re-implementation of src/tasks.rs (parse, apply, render, render_example)
# --------------------------------------------------------------------------------------------


def _parse(t: str):
    out, lit, i = [], [], 0
    while i < len(t):
        c = t[i]
        if c == "{" and t[i + 1 : i + 2] == "{":
            lit.append("{")
            i += 2
            continue
        if c == "}" and t[i + 1 : i + 2] == "}":
            lit.append("}")
            i += 2
            continue
        if c == "{":
            j = t.index("}", i + 1)
            inner = t[i + 1 : j]
            if lit:
                out.append(("lit", "".join(lit)))
                lit = []
            parts = [p.strip() for p in inner.split("|")]
            out.append(("field", parts[0], parts[1:]))
            i = j + 1
            continue
        if c == "}":
            raise ValueError(f"stray }} in {t!r}")
        lit.append(c)
        i += 1
    if lit:
        out.append(("lit", "".join(lit)))
    return out


def _rust_trim_end(s: str) -> str:
    # Rust's str::trim_end trims Unicode White_Space; Python's rstrip() also trims \x1c-\x1f.
    return s.rstrip()


def _apply(f: str, s: str) -> str:
    if f == "trim":
        return s.strip()
    if f == "lower":
        return s.lower()
    if f == "upper":
        return s.upper()
    if f in ("lcfirst", "ucfirst"):
        if not s:
            return s
        return (s[0].lower() if f == "lcfirst" else s[0].upper()) + s[1:]
    if f == "strip_period":
        t = _rust_trim_end(s)
        return t[:-1] if t and t[-1] in ".。।" else t
    return s


class Spec:
    def __init__(self, path: str):
        with open(path, "rb") as fh:
            self.raw = tomllib.load(fh)
        p = self.raw["prompt"]
        self.name = self.raw["name"]
        self.template = p["template"]
        self.choice = p.get("choice", " {choice}")
        self.answer = p.get("answer", " {answer}")
        self.label_words = p.get("label_words")
        self.vars = p.get("vars", {})
        self.eval_split = self.raw.get("eval_split", "test")

    def render(self, template: str, fields: dict) -> str:
        out = []
        for piece in _parse(template):
            if piece[0] == "lit":
                out.append(piece[1])
                continue
            _, name, filters = piece
            if name in self.vars:
                key = self.render(self.vars[name]["key"], fields)
                v = self.vars[name]["values"][key]
            else:
                v = fields[name]
                if v is None:
                    raise KeyError(f"row has no value for {name}")
            for f in filters:
                v = _apply(f, v)
            out.append(v)
        return "".join(out)

    def render_example(self, row: dict) -> dict:
        words = list(self.label_words) if self.label_words else list(row["choices"])
        gold = int(row["label"])
        fields = {k: row.get(k) for k in ("text", "question", "target", "rationale", "lang", "lang_code", "id")}
        fields["answer"] = words[gold]
        context = self.render(self.template, fields)
        choices = [self.render(self.choice, dict(fields, choice=w)) for w in words]
        answer = self.render(self.answer, fields)
        return {"context": context, "choices": choices, "gold": gold, "answer": answer, "words": words}


def _none(x):
    if x is None:
        return None
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def load_rows(data_dir: str, task: str, lang: str, split: str, limit: int | None):
    """Rows of one task x language x split in file order. `mlbench eval --limit N` takes a
    label-stratified subset when N is below the split size, so only whole splits (a limit of at
    least the split size) compare like with like; a smaller limit is refused."""
    import pandas as pd

    df = pd.read_parquet(os.path.join(data_dir, f"{task}.parquet"))
    sel = df[((df["lang"] == lang) | (df["lang_code"] == lang)) & (df["split"] == split)]
    if sel.empty:
        raise SystemExit(f"no rows for {task}/{lang}/{split}")
    if limit and limit < len(sel):
        raise SystemExit(
            f"--limit {limit} is below the {len(sel)} rows of {task}/{lang}/{split}: mlbench eval "
            "would take a label-stratified subset, not the first rows; compare whole splits"
        )
    rows = []
    for r in sel.to_dict("records"):
        r = {k: _none(v) for k, v in r.items() if k != "choices"} | {
            "choices": [str(c) for c in r["choices"]] if r["choices"] is not None else None
        }
        rows.append(r)
    return rows


def sha16(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()[:16]


def cmd_export(a):
    os.makedirs(a.out, exist_ok=True)
    spec = Spec(os.path.join(a.data_dir, "tasks", f"{a.task}.toml"))
    split = a.split or spec.eval_split
    manifest_path = os.path.join(a.out, "manifest.json")
    manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
    for lang in a.langs.split(","):
        rows = load_rows(a.data_dir, a.task, lang, split, a.limit)
        path = os.path.join(a.out, f"{a.task}_{lang}.jsonl")
        stock_diff = []
        with open(path, "w", encoding="utf-8") as fh:
            for i, r in enumerate(rows):
                ren = spec.render_example(r)
                rec = {
                    "doc_id": i,
                    "id": str(r["id"]),
                    "lang": r["lang"],
                    "lang_code": r["lang_code"],
                    "context": ren["context"],
                    "choices": ren["choices"],
                    "gold": ren["gold"],
                    "words": ren["words"],
                    "prompt_sha": sha16(ren["context"]),
                    "text": r["text"],
                    "question": r.get("question"),
                }
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                if a.task == "xcopa":
                    d = stock_xcopa_diff(r, ren)
                    if d:
                        stock_diff.append(d)
        manifest[f"{a.task}_{lang}"] = {"task": a.task, "lang": lang, "split": split, "n": len(rows), "file": path}
        print(f"exported {len(rows)} examples of {a.task}/{lang}/{split} -> {path}")
        if a.task == "xcopa":
            print(
                f"  stock lm-eval xcopa_{lang} prompt vs our spec: {len(stock_diff)} of {len(rows)} examples differ"
                " (request strings: context, target_delimiter ' ' + choice)"
            )
            for d in stock_diff[:5]:
                print("   ", json.dumps(d, ensure_ascii=False))
    json.dump(manifest, open(manifest_path, "w"), indent=1)


def stock_xcopa_diff(row: dict, ren: dict):
    """lm-eval's own xcopa task on the same row: premise.strip()[:-1] + ' ' + connector, choices
    lower-cased first letter, joined with target_delimiter ' '."""
    try:
        from lm_eval.tasks.xcopa import utils as xu  # type: ignore
    except Exception as e:  # pragma: no cover
        return {"error": f"cannot import lm_eval xcopa utils: {e}"}
    fn = getattr(xu, f"doc_to_text_{row['lang']}", None)
    if fn is None:
        return {"error": f"no stock connector for {row['lang']}"}
    doc = {
        "premise": row["text"],
        "question": row["question"],
        "choice1": row["choices"][0],
        "choice2": row["choices"][1],
        "label": row["label"],
    }
    ctx = fn(doc)
    conts = [" " + c for c in xu.doc_to_choice(doc)]
    if ctx != ren["context"] or conts != ren["choices"]:
        return {"id": row["id"], "stock_context": ctx, "ours": ren["context"], "stock_choices": conts, "our_choices": ren["choices"]}
    return None


# --------------------------------------------------------------------------------------------
# hf-folder: a view of an mlbench-imported model folder that transformers/lm-eval load as mlbench
# scores it
# --------------------------------------------------------------------------------------------


def cmd_hf_folder(a):
    """`mlbench model import` writes config.json + model.safetensors + tokenizer.json only: no
    tokenizer_config.json (so transformers knows no BOS/EOS/PAD token and lm-eval's HF backend
    fails in tok_encode with `'None' is not an instance of 'Sequence'`), and a tokenizer.json
    without a post-processor (so transformers adds no BOS for Gemma, while mlbench prepends BOS
    for Gemma 3 as the original Gemma tokenizer does). This writes a folder with the weights and
    config linked, plus tokenizer_config.json naming the special tokens from config.json and, for
    Gemma, a TemplateProcessing post-processor that prepends <bos>."""
    src = os.path.abspath(a.model)
    os.makedirs(a.out, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "config.json")))
    for f in os.listdir(src):
        if f in ("tokenizer.json", "tokenizer_config.json"):
            continue
        dst = os.path.join(a.out, f)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.join(src, f), dst)
    tj = json.load(open(os.path.join(src, "tokenizer.json"), encoding="utf-8"))
    v = tj["model"]["vocab"]
    inv = {i: k for k, i in v.items()} if isinstance(v, dict) else {i: p[0] for i, p in enumerate(v)}
    for t in tj.get("added_tokens", []):
        inv[t["id"]] = t["content"]
    add_bos = cfg.get("model_type", "").startswith("gemma")
    bos = cfg.get("bos_token_id")
    if add_bos and tj.get("post_processor") is None:
        b = inv[bos]
        tj["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b: {"id": b, "ids": [bos], "tokens": [b]}},
        }
    json.dump(tj, open(os.path.join(a.out, "tokenizer.json"), "w", encoding="utf-8"), ensure_ascii=False)
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
          "model_max_length": cfg.get("max_position_embeddings", 2048)}
    for name in ("bos", "eos", "pad"):
        i = cfg.get(f"{name}_token_id")
        if isinstance(i, list):
            i = i[0]
        if i is not None:
            tc[f"{name}_token"] = inv[i]
    json.dump(tc, open(os.path.join(a.out, "tokenizer_config.json"), "w"), indent=1)
    if a.check:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.out)
        ids = tok("Hello world")["input_ids"]
        print(f"hf-folder {a.out}: bos={tok.bos_token!r} eos={tok.eos_token!r} pad={tok.pad_token!r}; "
              f"'Hello world' -> {ids} (BOS first: {bool(ids) and ids[0] == bos})")
        if add_bos != (bool(ids) and ids[0] == bos):
            raise SystemExit("BOS policy differs from mlbench's")


# --------------------------------------------------------------------------------------------
# check-render: exported strings vs `mlbench tasks render`
# --------------------------------------------------------------------------------------------


def parse_render(out: str):
    ctx = out.split("--- context ---\n", 1)[1].split("\n--- choices ---\n", 1)
    context = ctx[0]
    rest = ctx[1].split("\n--- training answer ---\n", 1)[0]
    choices = []
    for line in rest.splitlines():
        m = re.match(r"^(\d+): (\".*\")( \(gold\))?$", line)
        if not m:
            raise ValueError(f"cannot parse choice line {line!r}")
        # Rust {:?} of a str: JSON-compatible for the characters seen here (\", \\, \n, \u{..}).
        s = re.sub(r"\\u\{([0-9a-fA-F]+)\}", lambda mm: chr(int(mm.group(1), 16)), m.group(2)[1:-1])
        s = s.replace('\\"', '"').replace("\\n", "\n").replace("\\t", "\t").replace("\\'", "'").replace("\\\\", "\\")
        choices.append(s)
    return context, choices


def cmd_check_render(a):
    bad = 0
    checked = 0
    for f in sorted(glob.glob(os.path.join(a.export, "*.jsonl"))):
        task = os.path.basename(f).split("_", 1)[0]
        recs = [json.loads(l) for l in open(f, encoding="utf-8")]
        step = max(1, len(recs) // a.max) if a.max else 1
        for rec in recs[::step][: a.max or None]:
            p = subprocess.run(
                [a.mlbench, "--quiet", "tasks", "render", "--data-dir", a.data_dir, "--task", task,
                 "--lang", rec["lang_code"], "--split", a.split, "--id", rec["id"]],
                capture_output=True, text=True, check=True,
            )
            ctx, ch = parse_render(p.stdout)
            checked += 1
            if ctx != rec["context"] or ch != rec["choices"]:
                bad += 1
                if bad <= 5:
                    print("MISMATCH", task, rec["id"], json.dumps({"mlbench": [ctx, ch], "export": [rec["context"], rec["choices"]]}, ensure_ascii=False))
    print(f"check-render: {checked} examples compared with `mlbench tasks render`, {bad} differ")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------
# compare: lm-eval samples vs mlbench samples.parquet
# --------------------------------------------------------------------------------------------


def lm_eval_samples(out_dir: str, task: str):
    fs = sorted(glob.glob(os.path.join(out_dir, "**", f"samples_{task}_*.jsonl"), recursive=True), key=os.path.getmtime)
    if not fs:
        raise SystemExit(f"no lm-eval samples for {task} under {out_dir}")
    return [json.loads(l) for l in open(fs[-1], encoding="utf-8")], fs[-1]


def argmax(v):
    best = 0
    for i, x in enumerate(v):
        if x > v[best]:
            best = i
    return best


def cmd_compare(a):
    import pandas as pd

    ours = pd.concat([pd.read_parquet(os.path.join(d, "samples.parquet")) for d in a.mlbench_out])
    ours = ours[ours["variant"] == "base"]
    summary = []
    worst = 0.0
    rc = 0
    for f in sorted(glob.glob(os.path.join(a.export, "*.jsonl"))):
        unit = os.path.basename(f)[: -len(".jsonl")]
        task = unit.split("_", 1)[0]
        lm_task = f"mlbench_{unit}"
        exp = [json.loads(l) for l in open(f, encoding="utf-8")]
        if a.only and unit not in a.only.split(","):
            continue
        try:
            lm, lm_file = lm_eval_samples(a.lm_eval_out, lm_task)
        except SystemExit as e:
            # A unit exported but never scored by lm-eval is a failed comparison, not a skip.
            print(e)
            rc = 1
            continue
        lm = {s["doc_id"]: s for s in lm}
        sub = ours[(ours["task"] == task) & (ours["lang"] == exp[0]["lang_code"])]
        by_id = {str(r["id"]): r for r in sub.to_dict("records")}
        n = 0
        str_bad = sha_bad = 0
        maxd = 0.0
        maxd_rel = 0.0
        dis = dis_norm = dis_bytes = 0
        acc = {"lm": [0, 0, 0, 0], "mb": [0, 0, 0, 0]}  # acc, acc_norm, acc_bytes, acc_norm(no space)
        lm_reported = {"acc": [], "acc_norm": [], "acc_bytes": []}
        missing = 0
        for e in exp:
            s = lm.get(e["doc_id"])
            r = by_id.get(e["id"])
            if s is None or r is None:
                missing += 1
                continue
            n += 1
            # Request strings lm-eval scored.
            args = s["arguments"]
            pairs = [(v["arg_0"], v["arg_1"]) for _, v in sorted(args.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))] if isinstance(args, dict) else [tuple(x) for x in args]
            if any(c != e["context"] for c, _ in pairs) or [x for _, x in pairs] != e["choices"]:
                str_bad += 1
                if str_bad <= 3:
                    print("  REQUEST MISMATCH", unit, e["id"], json.dumps({"lm_eval": pairs[0], "ours": [e["context"], e["choices"][0]]}, ensure_ascii=False))
            if r["prompt_sha"] != e["prompt_sha"]:
                sha_bad += 1
            lls_lm = [float(x[0]) for x in s["filtered_resps"]]
            lls_mb = [float(x) for x in r["logprobs"]]
            for x, y in zip(lls_lm, lls_mb):
                d = abs(x - y)
                maxd = max(maxd, d)
                maxd_rel = max(maxd_rel, d / max(1.0, abs(x)))
            ch = e["choices"]
            nl = [len(c) for c in ch]
            nb = [len(c.encode("utf-8")) for c in ch]
            nl_stock = [len(c.lstrip(" ")) or 1 for c in ch]
            g = e["gold"]
            for who, lls in (("lm", lls_lm), ("mb", lls_mb)):
                preds = [argmax(lls), argmax([l / k for l, k in zip(lls, nl)]), argmax([l / k for l, k in zip(lls, nb)]), argmax([l / k for l, k in zip(lls, nl_stock)])]
                for k, p in enumerate(preds):
                    acc[who][k] += int(p == g)
            # mlbench's own predictions vs lm-eval's.
            p_lm = argmax(lls_lm)
            dis += int(int(r["pred"]) != p_lm)
            # mlbench measures choice lengths without the one-space delimiter (stock lm-eval).
            nb_stock = [len(c.lstrip(" ").encode("utf-8")) or 1 for c in ch]
            dis_norm += int(int(r["pred_norm"]) != argmax([l / k for l, k in zip(lls_lm, nl_stock)]))
            dis_bytes += int(int(r["pred_bytes"]) != argmax([l / k for l, k in zip(lls_lm, nb_stock)]))
            for m in lm_reported:
                if m in s:
                    lm_reported[m].append(float(s[m]))
            if int(r["gold"]) != g:
                print("  GOLD MISMATCH", unit, e["id"], r["gold"], g)
                rc = 1
        worst = max(worst, maxd)
        mb_acc = sub["correct"].mean() if len(sub) else float("nan")
        row = {
            "unit": unit,
            "n": n,
            "missing": missing,
            "request_string_mismatches": str_bad,
            "prompt_sha_mismatches": sha_bad,
            "max_abs_logprob_diff": maxd,
            "max_rel_logprob_diff": maxd_rel,
            "disagree_acc": dis,
            "disagree_acc_norm": dis_norm,
            "disagree_acc_bytes": dis_bytes,
            "lm_eval_acc": acc["lm"][0] / max(n, 1),
            "mlbench_acc": acc["mb"][0] / max(n, 1),
            "lm_eval_acc_norm": acc["lm"][1] / max(n, 1),
            "mlbench_acc_norm": acc["mb"][1] / max(n, 1),
            "lm_eval_acc_bytes": acc["lm"][2] / max(n, 1),
            "mlbench_acc_bytes": acc["mb"][2] / max(n, 1),
            "lm_eval_acc_norm_len_without_space": acc["lm"][3] / max(n, 1),
            "mlbench_acc_norm_len_without_space": acc["mb"][3] / max(n, 1),
            "lm_eval_reported": {m: (sum(v) / len(v) if v else None) for m, v in lm_reported.items()},
            "mlbench_reported_primary": float(mb_acc),
            "lm_eval_samples": lm_file,
        }
        summary.append(row)
        if str_bad or sha_bad or missing:
            rc = 1
        if abs(row["lm_eval_acc"] - row["mlbench_acc"]) > 0.005 or abs(row["lm_eval_acc_norm"] - row["mlbench_acc_norm"]) > 0.005:
            rc = 1
    if not summary or any(r["n"] == 0 for r in summary):
        print("nothing compared for some units (no matching examples)")
        rc = 1
    hdr = f"{'unit':22} {'n':>4} {'strBad':>6} {'shaBad':>6} {'max|dlp|':>9} {'dis':>3} {'disN':>4} {'acc lm/mb':>13} {'acc_norm lm/mb':>15} {'acc_bytes lm/mb':>15}"
    print(hdr)
    for r in summary:
        print(
            f"{r['unit']:22} {r['n']:4d} {r['request_string_mismatches']:6d} {r['prompt_sha_mismatches']:6d} {r['max_abs_logprob_diff']:9.2e} {r['disagree_acc']:3d} {r['disagree_acc_norm']:4d}"
            f" {r['lm_eval_acc']:.4f}/{r['mlbench_acc']:.4f} {r['lm_eval_acc_norm']:.4f}/{r['mlbench_acc_norm']:.4f}  {r['lm_eval_acc_bytes']:.4f}/{r['mlbench_acc_bytes']:.4f}"
        )
    print(f"max |logprob diff| over all: {worst:.3e}")
    if a.json:
        json.dump(summary, open(a.json, "w"), indent=1)
    print("PARITY", "OK" if rc == 0 else "FAILED")
    return rc


# --------------------------------------------------------------------------------------------
# speed: summary of eval_speed.sh's runs
# --------------------------------------------------------------------------------------------


def parse_time_file(p: str):
    d = {}
    for line in open(p):
        if "=" in line:
            k, v = line.strip().split("=", 1)
            d[k] = v
    return d


def cmd_speed(a):
    rows = []
    for p in sorted(glob.glob(os.path.join(a.dir, "*.time"))):
        name = os.path.basename(p)[: -len(".time")]
        t = parse_time_file(p)
        meta = json.load(open(p[: -len(".time")] + ".meta.json"))
        wall = float(t["wall"])
        rss = int(t["maxrss_kb"]) / 1024 / 1024
        scoring = None
        if meta["tool"] == "mlbench":
            res = json.load(open(os.path.join(meta["out"], "results.json")))
            scoring = float(res["seconds"])
        else:
            log = open(meta["log"], errors="replace").read()
            scoring = lm_eval_scoring_seconds(log)
        n = meta["examples"]
        rows.append({
            "run": name, "tool": meta["tool"], "unit": meta["unit"], "examples": n, "wall_s": wall,
            "ex_per_s_wall": n / wall, "scoring_s": scoring,
            "ex_per_s_scoring": (n / scoring) if scoring else None, "peak_rss_gib": rss,
            "batch_size": meta.get("batch_size"), "matmul": meta.get("matmul", "f32"),
            "dtype": meta.get("dtype", "float32"),
            "build_during_run": os.path.exists(p[: -len(".time")] + ".busy"),
        })
    print(f"{'run':34} {'ex':>5} {'wall s':>8} {'ex/s':>7} {'score s':>8} {'ex/s':>7} {'RSS GiB':>7}")
    for r in rows:
        sc = f"{r['scoring_s']:8.1f} {r['ex_per_s_scoring']:7.2f}" if r["scoring_s"] else f"{'n/a':>8} {'n/a':>7}"
        print(f"{r['run']:34} {r['examples']:5d} {r['wall_s']:8.1f} {r['ex_per_s_wall']:7.2f} {sc} {r['peak_rss_gib']:7.2f}"
              + ("  (a build ran during this run: not a clean timing)" if r["build_during_run"] else ""))
    units = sorted({r["unit"] for r in rows})
    for u in units:
        lm = [r for r in rows if r["unit"] == u and r["tool"] == "lm_eval"]
        for mb in (r for r in rows if r["unit"] == u and r["tool"] == "mlbench"):
            for l in lm:
                ratio_w = mb["ex_per_s_wall"] / l["ex_per_s_wall"]
                ratio_s = (mb["ex_per_s_scoring"] / l["ex_per_s_scoring"]) if l["ex_per_s_scoring"] and mb["ex_per_s_scoring"] else None
                print(f"ratio {u} mlbench(bs={mb['batch_size']}, matmul={mb['matmul']}) / lm_eval(bs={l['batch_size']}, dtype={l['dtype']}): whole process {ratio_w:.2f}x"
                      + (f", scoring only {ratio_s:.2f}x" if ratio_s else ""))
    # Batch-size independence of mlbench's scores (lm-eval #704, #1645: theirs are not).
    import pandas as pd

    for u in units:
        mbs = sorted((r for r in rows if r["unit"] == u and r["tool"] == "mlbench"), key=lambda r: (r["matmul"] != "f32", r["batch_size"]))
        for x, y in zip(mbs, mbs[1:]):
            dx = pd.read_parquet(os.path.join(json.load(open(os.path.join(a.dir, x["run"] + ".meta.json")))["out"], "samples.parquet"))
            dy = pd.read_parquet(os.path.join(json.load(open(os.path.join(a.dir, y["run"] + ".meta.json")))["out"], "samples.parquet"))
            m = dx.merge(dy, on=["task", "lang", "id"])
            d = max((abs(p - q) for lx, ly in zip(m["logprobs_x"], m["logprobs_y"]) for p, q in zip(lx, ly)), default=0.0)
            print(f"mlbench {u}: bs={x['batch_size']} {x['matmul']} vs bs={y['batch_size']} {y['matmul']}: max |logprob diff| {d:.2e}, "
                  f"{int((m['pred_x'] != m['pred_y']).sum())} of {len(m)} predictions differ")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


def lm_eval_scoring_seconds(log: str):
    """Seconds lm-eval spent in its loglikelihood loop, from the tqdm bar it prints
    ("Running loglikelihood requests: 100%|...| N/N [MM:SS<00:00, ...]")."""
    best = None
    for m in re.finditer(r"Running loglikelihood requests: 100%\|[^|]*\| *(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<", log):
        h = int(m.group(3) or 0)
        s = h * 3600 + int(m.group(4)) * 60 + int(m.group(5))
        best = s if best is None else max(best, s)
    return float(best) if best is not None else None


def _cpu_ticks():
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = open(f"/proc/{d}/stat").read()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            f = raw[raw.rindex(")") + 2 :].split()
            # fields after comm: state ppid pgrp session ... utime(14th overall) stime(15th)
            out[int(d)] = (comm, int(f[2]), int(f[11]) + int(f[12]))
        except (OSError, ValueError, IndexError):
            pass
    return out


def cmd_busy(a):
    """Exit 0 when the machine is quiet: no build process and, over `--seconds`, under
    `--max-cpu` percent of one core used by processes outside process group `--pgid` (ours)."""
    import time

    builds = {"cargo", "rustc", "nvcc", "ptxas"}
    t0 = _cpu_ticks()
    time.sleep(a.seconds)
    t1 = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (comm, pgrp, ticks) in t1.items():
        if comm in builds:
            busy.append(f"{comm}[{pid}] (build)")
            continue
        if pgrp == a.pgid or pid == os.getpid():
            continue
        prev = t0.get(pid, (comm, pgrp, ticks))[2]
        pct = 100.0 * (ticks - prev) / hz / a.seconds
        if pct > a.max_cpu:
            busy.append(f"{comm}[{pid}] {pct:.0f}%")
    if busy:
        try:
            print(" ".join(busy), flush=True)
        except BrokenPipeError:
            pass
        return 1
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    e = sp.add_parser("export")
    e.add_argument("--data-dir", default="datasets")
    e.add_argument("--out", required=True)
    e.add_argument("--task", required=True)
    e.add_argument("--langs", required=True)
    e.add_argument("--split")
    e.add_argument("--limit", type=int)
    h = sp.add_parser("hf-folder")
    h.add_argument("--model", required=True)
    h.add_argument("--out", required=True)
    h.add_argument("--check", action="store_true")
    c = sp.add_parser("check-render")
    c.add_argument("--mlbench", required=True)
    c.add_argument("--data-dir", default="datasets")
    c.add_argument("--export", required=True)
    c.add_argument("--split", default="test")
    c.add_argument("--max", type=int, default=0, help="examples per file (0: all)")
    m = sp.add_parser("compare")
    m.add_argument("--export", required=True)
    m.add_argument("--lm-eval-out", required=True)
    m.add_argument("--mlbench-out", required=True, nargs="+", help="mlbench eval output folder(s)")
    m.add_argument("--only", help="comma-separated units (task_lang) to compare")
    m.add_argument("--json")
    s = sp.add_parser("speed")
    s.add_argument("--dir", required=True)
    s.add_argument("--json")
    b = sp.add_parser("busy")
    b.add_argument("--pgid", type=int, default=-1, help="our process group (not counted)")
    b.add_argument("--seconds", type=float, default=3.0)
    b.add_argument("--max-cpu", type=float, default=15.0, help="percent of one core per process")
    a = ap.parse_args()
    f = {"export": cmd_export, "hf-folder": cmd_hf_folder, "busy": cmd_busy, "check-render": cmd_check_render, "compare": cmd_compare, "speed": cmd_speed}[a.cmd]
    sys.exit(f(a) or 0)


if __name__ == "__main__":
    main()
