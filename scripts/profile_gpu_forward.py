"""Profile the GPU forward paths of the experiment model (random weights, bf16): plain model call,
forward_chunk, forward_chunk inside an NVML window with the sampler running, and a torch.profiler
table of one forward_chunk (where the host waits and which kernels take the time).

    PYTHONPATH=. python scripts/profile_gpu_forward.py [--batch 64] [--seq-len 1024]
"""

import argparse
import time

import torch

from benchmarks.forward_chunk import build_model
from nectar.experiment.forward import forward_chunk


def timed(label, fn, tokens, n=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    print(f"{label:<40} {dt * 1e3:8.1f} ms  {tokens / dt / 1e6:6.2f} M tok/s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    model = build_model(8192, torch.bfloat16, torch.device("cuda"))
    x = torch.randint(0, 8192, (args.batch, args.seq_len), device="cuda")
    tokens = x.numel()
    with torch.no_grad():
        timed("plain forward", lambda: model(input_ids=x, use_cache=False), tokens)
    timed("forward_chunk", lambda: forward_chunk(model, x), tokens)
    from hw.backend import NvmlBackend

    backend = NvmlBackend()
    timed("forward_chunk in NVML window (sampler)", lambda: backend.run_chunk(lambda: forward_chunk(model, x).workload),
          tokens)
    backend.close()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward_chunk(model, x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
