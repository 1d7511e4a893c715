"""Layer 2: the --max-memory / --max-cpu caps: memory estimates, plans, and the governor."""
