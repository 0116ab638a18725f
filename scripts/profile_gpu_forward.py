"""Profile the GPU forward paths of the experiment model (random weights): plain model call,
forward_chunk, and forward_chunk inside an NVML window with the sampler running."""

import time

import torch

from nectar.train.recipes import RECIPES
from nectar.experiment.runner import forward_chunk, install
from nectar.model import MoEGPT2LMHeadModel, preset_config
from nectar.experiment.policies import make_router


def timed(label, fn, n=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    print(f"{label:<40} {dt * 1e3:8.1f} ms  {65536 / dt / 1e6:6.2f} M tok/s", flush=True)


def main():
    r = RECIPES["distilgpt2"]
    cfg = preset_config("distilgpt2-moe", vocab_size=8192, expert_specs=r.expert_specs(3072), n_experts=0)
    model = MoEGPT2LMHeadModel(cfg).cuda().to(torch.bfloat16).eval()
    install(model, [make_router("static-top2", layer) for _, layer in model.moe_layers()])
    x = torch.randint(0, 8192, (64, 1024), device="cuda")
    with torch.no_grad():
        timed("plain forward", lambda: model(input_ids=x))
        timed("forward + chunk_workload", lambda: (model(input_ids=x), model.chunk_workload(64, 1024)))
    timed("forward_chunk", lambda: forward_chunk(model, x))
    from hw.backend import NvmlBackend

    backend = NvmlBackend()
    timed("forward_chunk in NVML window (sampler)", lambda: backend.run_chunk(None, lambda: forward_chunk(model, x)))
    backend.close()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward_chunk(model, x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
