"""The shapes of gemm_bench.rs in PyTorch (x @ W.T, f32, CPU): GFLOP/s, median of 7 after 2
warm-ups. Threads: torch.set_num_threads(THREADS, default 2).
Run: python benchmarks/perf/gemm_bench_torch.py"""
import os
import time

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
torch.manual_seed(0)
SHAPES = [
    ("smollm2 q/o", 576, 576),
    ("smollm2 k/v", 576, 192),
    ("smollm2 gate/up", 576, 1536),
    ("smollm2 down", 1536, 576),
    ("gemma q", 640, 1024),
    ("gemma gate/up", 640, 2048),
    ("gemma down", 2048, 640),
    ("gemma logits (256 rows)", 640, 262_144),
]
with torch.no_grad():
    for name, k, n in SHAPES:
        rows = 256 if "256 rows" in name else 1024
        x = torch.randn(rows, k)
        w = torch.randn(n, k) * 0.05
        times = []
        for i in range(9):
            t0 = time.perf_counter()
            y = x @ w.T
            if i >= 2:
                times.append(time.perf_counter() - t0)
        times.sort()
        t = times[len(times) // 2]
        print(f"{name:<24} m={rows:<5} k={k:<5} n={n:<6} {t * 1e3:>8.3f} ms {2 * rows * n * k / t / 1e9:>7.1f} GFLOP/s")
