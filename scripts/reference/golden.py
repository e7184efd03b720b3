"""Golden values for mlbench's tiny models from the PyTorch reference (transformers + PEFT).

For each architecture: `mlbench model tiny --arch A --seed 0` writes the model; this script
loads it with transformers, wraps it with a PEFT LoRA (r=4, alpha=8, all 7 projections,
init_lora_weights=False so B is not zero, torch seed 0), saves the adapter with PEFT's own
`save_pretrained`, and records: the token ids HF's tokenizer gives for a fixed text, base and
adapted logits at three positions, and lm-evaluation-harness-style log-likelihoods of two
requests. Output: tests/fixtures/golden/<arch>/{adapter/, golden.json}.

Run (from the repository root, with torch/transformers/peft installed):
    cargo build && python scripts/reference/golden.py target/debug/mlbench
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

TEXT = "the cat sat on the mat, and then it rained in the morning."
REQUESTS = [("the cat sat on", " the mat"), ("then it rained in the ", "morning.")]
POSITIONS = [0, 5, -1]


def loglik(model, ids_ctx, ids_cont):
    inp = torch.tensor([ids_ctx + ids_cont[:-1]])
    with torch.no_grad():
        logits = model(input_ids=inp).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    n = len(ids_ctx)
    total, greedy = 0.0, True
    for j, t in enumerate(ids_cont):
        row = lp[n - 1 + j]
        total += float(row[t])
        greedy = greedy and int(row.argmax()) == t
    return total, greedy


def main(binary):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    for arch in ["gemma3", "llama", "qwen2"]:
        out = os.path.join("tests", "fixtures", "golden", arch)
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([binary, "--quiet", "model", "tiny", "--arch", arch, "--out", tmp, "--seed", "0"], check=True)
            sha = hashlib.sha256(open(os.path.join(tmp, "model.safetensors"), "rb").read()).hexdigest()
            tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tmp, "tokenizer.json"))
            model = AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32, attn_implementation="eager")
            model.eval()
            add_bos = arch == "gemma3"
            bos = model.config.bos_token_id

            def enc(s):
                ids = tok(s, add_special_tokens=False)["input_ids"]
                return ([bos] if add_bos else []) + ids

            ids = enc(TEXT)
            with torch.no_grad():
                base = model(input_ids=torch.tensor([ids])).logits[0]
            cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
            peft_model = get_peft_model(model, cfg)
            peft_model.eval()
            with torch.no_grad():
                adapted = peft_model(input_ids=torch.tensor([ids])).logits[0]
            peft_model.save_pretrained(os.path.join(out, "adapter"))
            reqs = []
            for ctx0, cont0 in REQUESTS:
                ctx, cont = ctx0, cont0
                # lm-evaluation-harness `_encode_pair`: trailing spaces move to the continuation.
                n_spaces = len(ctx) - len(ctx.rstrip())
                if n_spaces > 0:
                    cont = ctx[-n_spaces:] + cont
                    ctx = ctx[:-n_spaces]
                whole = enc(ctx + cont)
                c = enc(ctx)
                lp, greedy = loglik(peft_model, c, whole[len(c):])
                reqs.append({"context": ctx0, "continuation": cont0, "logprob": lp, "greedy": greedy,
                             "context_ids": c, "continuation_ids": whole[len(c):]})
            golden = {
                "arch": arch,
                "model_sha256": sha,
                "text": TEXT,
                "ids": ids,
                "positions": [p % len(ids) for p in POSITIONS],
                "base_logits": [base[p].tolist() for p in POSITIONS],
                "adapted_logits": [adapted[p].tolist() for p in POSITIONS],
                "requests": reqs,
                "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                             "peft": __import__("peft").__version__},
            }
            with open(os.path.join(out, "golden.json"), "w") as f:
                json.dump(golden, f)
            print(arch, "ok", sha[:12], len(ids), "tokens")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/debug/mlbench")
