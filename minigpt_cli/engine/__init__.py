"""The library under the CLI, in layers: a module imports only from lower layers or its own package.

`LAYERS` is the one declaration of that order; `tests/test_layers.py` reads it, walks every import
in the package (function-level ones included), and fails on an upward import or an import cycle.
`docs/ARCHITECTURE.md` maps every module. Nothing is imported here, so `import minigpt_cli.engine.X`
pulls in only what X needs (the estimate module must stay torch-free for the CLI's fast start).
"""

# Lowest first. Packages on one rank may not import each other; a package may import itself.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("hardware",),
    ("resources",),
    ("model",),
    ("data",),
    ("runs", "objectives", "inference"),
    ("metrics", "training"),
    ("stages",),
    ("evaluate", "doctor", "export", "serve"),
)
