"""Layer 0: plumbing every layer may use: atomic writes, progress events, seeding, units."""
