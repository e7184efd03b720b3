"""Real-model parity: the HF folder that `mlbench model import` wrote, run by transformers,
against `mlbench score` on the same requests (lm-evaluation-harness pair encoding).

Builds requests from SIB-200 test sentences (context = the first half of the words,
continuation = the rest), runs both, and prints the largest log-likelihood difference and how
often the greedy flags agree. Usage (repository root, torch + transformers installed):
    python scripts/reference/real_parity.py models/gemma-3-270m target/release/mlbench [n]
"""
import json
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def main(folder, binary, n=24):
    import pyarrow.parquet as pq
    t = pq.read_table("datasets/sib200.parquet", columns=["lang", "split", "text"]).to_pandas()
    texts = []
    for lang in ["eng_Latn", "fra_Latn", "swh_Latn", "zho_Hans"]:
        texts += t[(t.lang == lang) & (t.split == "test")].text.head(n // 4).tolist()
    reqs = []
    for s in texts:
        cut = len(s) // 2
        reqs.append({"context": s[:cut], "continuation": s[cut:]})
    cfg = json.load(open(f"{folder}/config.json"))
    add_bos = cfg["model_type"].startswith("gemma")
    bos = cfg.get("bos_token_id")
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{folder}/tokenizer.json")
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager").eval()

    def enc(s):
        return ([bos] if add_bos else []) + tok(s, add_special_tokens=False)["input_ids"]

    ref = []
    t0 = time.time()
    for r in reqs:
        ctx, cont = r["context"], r["continuation"]
        k = len(ctx) - len(ctx.rstrip())
        if k:
            ctx, cont = ctx[:-k], ctx[-k:] + cont
        whole, c = enc(ctx + cont), enc(ctx)
        cont_ids = whole[len(c):]
        inp = torch.tensor([c + cont_ids[:-1]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=inp).logits[0].double(), -1)
        tot, greedy = 0.0, True
        for j, tt in enumerate(cont_ids):
            row = lp[len(c) - 1 + j]
            tot += float(row[tt])
            greedy = greedy and int(row.argmax()) == tt
        ref.append((tot, greedy, len(cont_ids)))
    t_ref = time.time() - t0
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    t0 = time.time()
    out = subprocess.run([binary, "--quiet", "score", "--model", folder, "--requests", f.name, "--batch-size", "8"],
                         check=True, capture_output=True, text=True).stdout
    t_ml = time.time() - t0
    ours = [json.loads(l) for l in out.splitlines()]
    diffs = [abs(o["logprob"] - r[0]) for o, r in zip(ours, ref)]
    rel = [d / max(1.0, abs(r[0])) for d, r in zip(diffs, ref)]
    agree = sum(o["greedy"] == r[1] for o, r in zip(ours, ref))
    toks = sum(r[2] for r in ref)
    print(f"requests={len(reqs)} continuation_tokens={toks}")
    print(f"max |logprob diff|={max(diffs):.2e} max relative={max(rel):.2e} greedy flags agree {agree}/{len(reqs)}")
    print(f"token counts agree: {all(o['tokens'] == r[2] for o, r in zip(ours, ref))}")
    print(f"wall: transformers (one request at a time, in-process) {t_ref:.1f}s; mlbench score (process, batch 8) {t_ml:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 24)
