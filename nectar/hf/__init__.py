"""NECTAR for pretrained transformers MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3).

families (each family's own selection and gate maths), describe (per-block widths and FLOPs),
drop (how unused slots reach the experts), layer (one MoE block as NECTAR sees it), adapter (the
attached model, shaped like MoE-DistilGPT2), attach (gate hooks in, out), routers (static routers
over the family's top-K), threshold (the adaptive-k rule and its cost + λ·KL threshold),
adaptive_k (the adaptive-k router), policies (names → routers), load (a saved model from a
directory, attached; `nectar.train.saved_model` reads the rest of a saved experiment model),
train_small (a small OLMoE-style model trained from scratch on the project's corpus).
"""

from nectar.hf.adapter import AttachedMoE
from nectar.hf.attach import attach, detach
from nectar.hf.describe import describe
from nectar.hf.load import is_hf_moe_dir, load_moe

__all__ = ["AttachedMoE", "attach", "detach", "describe", "is_hf_moe_dir", "load_moe"]
