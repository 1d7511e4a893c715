"""Layer 0: plumbing every layer may use: atomic file writes and the engine's progress events."""
