"""Layer 6: the one training loop (Trainer, Stage protocol), its optimizer, step timing, curves."""
