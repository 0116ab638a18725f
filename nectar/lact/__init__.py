"""LaCT ("Test-Time Training Done Right"): the large-chunk SwiGLU fast-weight kernel (Algorithm 1), the
LaCT expert, the hybrid window-attention layer (Algorithm 2), and their multi-process forms on
torch.distributed (Algorithms 3–4, `parallel`), with differentiable collectives (`collectives`) and a
local process-group launcher for tests and benchmarks (`launch`)."""
