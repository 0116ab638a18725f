"""Training the models NECTAR routes: the offline corpus, the tokenizer, the training loop and the recipes
(dense DistilGPT2-shape parent → sparse upcycling → MoE fine-tune)."""
