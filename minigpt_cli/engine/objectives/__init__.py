"""Layer 5: pure tensor maths of the training objectives (no model, no I/O)."""
