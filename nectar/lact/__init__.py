"""LaCT ("Test-Time Training Done Right"): the large-chunk SwiGLU fast-weight kernel (Algorithm 1), the
LaCT expert, the hybrid window-attention layer (Algorithm 2), and their multi-GPU forms (Algorithms 3–4)."""
