"""Layer 5: running a trained model: sampling, beam search, greedy batches, reward scores, chat."""
