"""Layer 6: the one training loop (Trainer, the Stage contract), what fine-tuning shares, curves."""
