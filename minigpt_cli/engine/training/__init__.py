"""Layer 6: the one training loop (Trainer, the Stage protocol) and its curves."""
