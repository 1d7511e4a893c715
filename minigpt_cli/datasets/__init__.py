"""Built-in sample data, so every verb runs with no --data: see `builtin` (generator) and `tables`.

Pure Python and deterministic; nothing here is ever downloaded.
"""
