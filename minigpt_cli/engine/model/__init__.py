"""Layer 3: the networks: the GPT (Llama-style decoder), LoRA adapters, and the heads RLHF adds."""
