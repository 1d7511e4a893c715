"""Layer 5: running a trained model: sampling and beam search, and the interactive chat session."""
