"""The peer of benchmarks/perf/train_pools.sh: LoRA on real few-shot pools (lora-k) and
first-order MeTA-LoRA, written the way a careful PyTorch + transformers + PEFT user would.

Same inputs as `mlbench train`: the pool file `mlbench data sample` wrote (ids in draw order),
the task's prompt template from datasets/tasks/<task>.toml, lm-evaluation-harness's pair
encoding (context ids, then the rest of the whole string's ids), sequences capped at max_len.
Same hyper-parameters as mlbench's defaults: LoRA r=8, alpha=16, dropout 0.05 on q,k,v,o;
AdamW lr 2e-4 (betas 0.9/0.999, eps 1e-8, no decay), 5% linear warm-up then cosine, gradient
clip 1.0; lora-k: batches of 8, length-bucketed like mlbench (groups of 8 batches sorted by
length); MeTA-LoRA: every task per meta-batch (at most 8), 4 support + 4 query examples, 3
SGD inner steps at 1e-3, mean of the query gradients. The savvy loss: the decoder's hidden
states, then the output matrix only at the positions that predict answer tokens, dynamic
padding. Training time excludes loading and tokenising. Prints one JSON line.

usage: train_pools_peft.py --model DIR --task-file T.toml --data D.parquet --pools P.parquet
       --method lora-k|meta-lora [--passes 1] [--meta-iterations 4] [--threads 2] [--seed 0]
"""
import argparse
import json
import math
import random
import resource
import time
import tomllib

import pyarrow.parquet as pq
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_examples(task_file, data, pools):
    spec = tomllib.load(open(task_file, "rb"))
    prompt = spec["prompt"]
    words = prompt.get("label_words")
    rows = pq.read_table(data).to_pylist()
    by_key = {(r["lang"], r["id"]): r for r in rows if r["split"] == spec["train_split"]}
    units = {}
    for p in pq.read_table(pools).to_pylist():
        r = by_key[(p["lang"], p["id"])]
        answer = (words or r["choices"])[r["label"]]
        context = prompt["template"].replace("{text}", r["text"])
        units.setdefault(p["lang"], []).append((context, prompt["answer"].replace("{answer}", answer)))
    return units


def encode(tok, context, continuation, max_len):
    """lm-evaluation-harness's pair encoding after a BOS, then the prompt cut from the left
    (BOS kept)."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tok(context + continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    ans = whole[len(ctx):]
    # mlbench starts every sequence with the model's BOS; this tokenizer.json may not add it.
    bos = tok.bos_token_id
    if bos is not None and ctx[:1] != [bos]:
        ctx = [bos] + ctx
    room = max_len - len(ans)
    if len(ctx) > room:
        ctx = ctx[:1] + ctx[len(ctx) - room + 1:]
    return ctx + ans, len(ctx)


def answer_loss(model, seqs, pad_id):
    """Token-mean cross-entropy of the answer tokens; logits only where a loss is taken."""
    t = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    rows, targets = [], []
    for b, (s, start) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        for p in range(start, len(s)):
            rows.append(b * t + p - 1)
            targets.append(s[p])
    base = model.get_base_model()
    hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(rows)]
    logits = base.lm_head(picked)
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets))


def schedule(step, total, warmup=0.05):
    w = math.ceil(warmup * total)
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def lora_k(model, units, passes, rng, pad_id):
    items = [s for u in units.values() for s in u]
    steps = math.ceil(math.ceil(passes * len(items)) / 8)
    plan = []
    while len(plan) < steps:
        order = items[:]
        rng.shuffle(order)
        batches = []
        for g in range(0, len(order), 64):
            group = sorted(order[g : g + 64], key=lambda s: len(s[0]))
            batches += [group[i : i + 8] for i in range(0, len(group), 8)]
        rng.shuffle(batches)
        plan += batches
    plan = plan[:steps]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps))
    tokens, losses = 0, []
    for batch in plan:
        loss = answer_loss(model, batch, pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(len(s) for s, _ in batch)
        losses.append(loss.item())
    return steps, tokens, losses


def meta_lora(model, units, iterations, rng, pad_id):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, iterations))
    names = sorted(units)
    tokens, losses = 0, []
    for _ in range(iterations):
        theta = [p.detach().clone() for p in params]
        meta = [torch.zeros_like(p) for p in params]
        tasks = rng.sample(names, min(8, len(names)))
        qloss = 0.0
        for name in tasks:
            drawn = rng.sample(units[name], 8)
            support = sorted(drawn[:4], key=lambda s: len(s[0]))
            query = sorted(drawn[4:], key=lambda s: len(s[0]))
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
            for _ in range(3):
                g = torch.autograd.grad(answer_loss(model, support, pad_id), params)
                with torch.no_grad():
                    for p, gi in zip(params, g):
                        p.sub_(1e-3 * gi)
                tokens += sum(len(s) for s, _ in support)
            lq = answer_loss(model, query, pad_id)
            g = torch.autograd.grad(lq, params)
            for m, gi in zip(meta, g):
                m.add_(gi / len(tasks))
            tokens += sum(len(s) for s, _ in query)
            qloss += lq.item() / len(tasks)
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
        for p, m in zip(params, meta):
            p.grad = m
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(qloss)
    return iterations, tokens, losses


def main():
    ap = argparse.ArgumentParser()
    for a in ["--model", "--task-file", "--data", "--pools", "--method"]:
        ap.add_argument(a, required=True)
    ap.add_argument("--passes", type=float, default=1.0)
    ap.add_argument("--meta-iterations", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    model.train()
    units = {
        lang: [encode(tok, c, ans, a.max_len) for c, ans in exs]
        for lang, exs in load_examples(a.task_file, a.data, a.pools).items()
    }
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.perf_counter()
    if a.method == "lora-k":
        steps, tokens, losses = lora_k(model, units, a.passes, rng, pad_id)
    elif a.method == "meta-lora":
        steps, tokens, losses = meta_lora(model, units, a.meta_iterations, rng, pad_id)
    else:
        raise SystemExit(f"unknown method {a.method}")
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "tool": "pytorch+peft", "method": a.method, "steps": steps, "tokens": tokens,
        "train_seconds": seconds, "tokens_per_s": tokens / seconds,
        "first_loss": losses[0], "last_loss": losses[-1],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
