"""Built-in sample data, so every verb runs with no --data: see `builtin` (generator) and `tables`.

Pure Python and deterministic; nothing here is ever downloaded.
"""

# The seed `pretrain` generates its built-in corpus with; `doctor` sizes the same corpus by it.
BUILTIN_DATA_SEED = 0
