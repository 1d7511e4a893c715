"""Layer 6: what a trained model is scored by: exact match on held-out tasks, text metrics."""
