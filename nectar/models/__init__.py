"""The models NECTAR routes, built here: MoE-DistilGPT2 (`nectar.models.gpt2_moe`, a Hugging Face
GPT-2 language model whose chosen blocks' MLP is a NECTAR MoE layer). The transformers MoE families
(Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3) are not built here: they are adapted in `nectar.hf`."""
