"""Layer 7: one module per training verb, each supplying what differs, ending in run_<verb>()."""
