"""transformers' trust_remote_code entry point of a NECTAR MoE-DistilGPT2 checkpoint.

The classes come from the installed `nectar` package (the repository on PYTHONPATH, or
`pip install -e .` in it); nothing else is loaded from this directory.
"""

from nectar.models.gpt2_moe import MoEGPT2Config, MoEGPT2LMHeadModel  # noqa: F401
