"""The PyTorch + transformers + PEFT peer of model_bench.rs: same folder, same shapes.

Batch 8 x 128 random token ids, LoRA r=8 alpha=16 on q,k,v,o (dropout 0), AdamW lr 1e-4,
2 threads, f32. Median of `steps` timed steps after 2 warm-up steps for: forward with full
logits, train step with the loss on all positions (the PEFT default), and train step with the
loss on the last 4 tokens using `logits_to_keep` (the savvy user's setting).
Run: python benchmarks/perf/model_bench_torch.py models/gemma-3-270m [steps]
Device and dtype as for model_bench.rs: MLBENCH_DEVICE=cpu|cuda|cuda:N (default cpu) and
MLBENCH_DTYPE=f32|bf16|f16 (default f32); the LoRA weights keep the model's dtype (PEFT's
autocast of adapters to f32 is off), as in mlbench. On CUDA each timed step ends with
torch.cuda.synchronize() and the peak allocated GPU memory is printed. ATTN picks the attention
implementation (default eager, like the CPU figures; sdpa is what transformers uses by default).
MLBENCH_MATMUL=bf16 runs forward and loss under torch.autocast(cpu, bfloat16), the PyTorch
counterpart of `mlbench --matmul bf16` (linear layers take bf16 inputs on oneDNN/AMX, the rest
stays f32).
"""
import contextlib
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

B, T = 8, 128


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(folder, steps):
    dev_name = os.environ.get("MLBENCH_DEVICE", "cpu")
    dtype_name = os.environ.get("MLBENCH_DTYPE", "f32")
    attn = os.environ.get("ATTN", "eager")
    matmul = os.environ.get("MLBENCH_MATMUL", "f32")
    amp = (lambda: torch.autocast(device_type=dev_name.split(":")[0], dtype=torch.bfloat16)) if matmul == "bf16" else contextlib.nullcontext
    dev = torch.device(dev_name)
    dtype = DTYPES[dtype_name]
    if dev.type == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn).to(dev)
    sync(dev)
    load_s = time.time() - t0
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (B, T + 1)).to(dev)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), autocast_adapter_dtype=False)
    print(f"model={folder} device={dev_name} dtype={dtype_name} matmul={matmul} attn={attn} load_s={load_s:.2f} threads={torch.get_num_threads()} batch={B}x{T} steps={steps}")
    model.eval()
    times = []
    for i in range(steps + 2):
        t = time.time()
        with torch.no_grad(), amp():
            out = model(input_ids=ids[:, :T]).logits
            out.max(-1).values.sum().item()
        sync(dev)
        if i >= 2:
            times.append(time.time() - t)
    f = sorted(times)[len(times) // 2]
    print(f"forward_full_logits tokens_per_s={B * T / f:.1f} step_s={f:.3f}")
    model.train()
    for name, keep in [("train_loss_all_positions", 0), ("train_loss_last4", 4)]:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for i in range(steps + 2):
            t = time.time()
            with amp():
                if keep:
                    logits = model(input_ids=ids[:, :T], logits_to_keep=keep).logits
                    tgt = ids[:, T - keep + 1:T + 1]
                else:
                    logits = model(input_ids=ids[:, :T]).logits
                    tgt = ids[:, 1:T + 1]
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), tgt.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            sync(dev)
            if i >= 2:
                times.append(time.time() - t)
        s = sorted(times)[len(times) // 2]
        print(f"{name} tokens_per_s={B * T / s:.1f} step_s={s:.3f} loss={loss.item():.3f}")
    if dev.type == "cuda":
        print(f"peak_gpu_allocated_mib={torch.cuda.max_memory_allocated(dev) / 2**20:.0f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5)
