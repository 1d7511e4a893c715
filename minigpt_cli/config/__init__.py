"""Configuration: the schema (every default), presets, TOML loading and dumping, --set overrides.

Importing this package is cheap on purpose: the CLI imports it at start-up for `PRESETS` (option
help, shell completion), and `minigpt --help` must not pay for pydantic building its models. The
names below are loaded from `loader` / `schema` on first use (PEP 562 module `__getattr__`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The built-in presets, smallest first. Defined here (not in sources.py, which reads them) so
# reading it imports nothing heavy.
PRESETS: tuple[str, ...] = ("tiny", "small", "medium", "large")

_LAZY: dict[str, str] = {
    "load_config": "loader",
    "load_preset": "sources",
    "dump_config": "loader",
    "read_run_config": "loader",
    "preset_summary": "loader",
    "parse_set": "sources",
    "Config": "schema",
    "ModelConfig": "schema",
    "TokenizerConfig": "schema",
    "DataConfig": "schema",
    "TrainConfig": "schema",
    "StageTrainConfig": "schema",
    "PretrainConfig": "schema",
    "GenerateConfig": "schema",
    "ResourcesConfig": "schema",
    "LogConfig": "schema",
    "parse_duration": "schema",
    "parse_memory": "schema",
    "MIN_VOCAB_SIZE": "schema",
    "MAX_VOCAB_SIZE": "schema",
}

__all__ = [
    "MAX_VOCAB_SIZE",
    "MIN_VOCAB_SIZE",
    "PRESETS",
    "Config",
    "DataConfig",
    "GenerateConfig",
    "LogConfig",
    "ModelConfig",
    "PretrainConfig",
    "ResourcesConfig",
    "StageTrainConfig",
    "TokenizerConfig",
    "TrainConfig",
    "dump_config",
    "load_config",
    "load_preset",
    "parse_duration",
    "parse_memory",
    "parse_set",
    "preset_summary",
    "read_run_config",
]

if TYPE_CHECKING:
    from minigpt_cli.config.loader import (
        dump_config,
        load_config,
        preset_summary,
        read_run_config,
    )
    from minigpt_cli.config.schema import (
        MAX_VOCAB_SIZE,
        MIN_VOCAB_SIZE,
        Config,
        DataConfig,
        GenerateConfig,
        LogConfig,
        ModelConfig,
        PretrainConfig,
        ResourcesConfig,
        StageTrainConfig,
        TokenizerConfig,
        TrainConfig,
        parse_duration,
        parse_memory,
    )
    from minigpt_cli.config.sources import load_preset, parse_set


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
