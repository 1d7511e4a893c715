"""Turn presets, a TOML file, CLI flags and `--set` strings into one validated `Config`.

Layers, lowest precedence first: schema defaults < preset < `--config FILE` < explicit flags
(`overrides`) < `--set section.key=value`. Each layer is checked for unknown sections and keys on
its own (`sources.py`, so the message can name the file and line it came from), the layers are
merged section by section, and the result is validated once here. Every problem becomes a
`UserError` whose lines each say where the bad value came from, what it was, and what is allowed.

`dump_config` writes the inverse: the fully resolved TOML that `load_config(None, that_file)` turns
back into an equal `Config`, and that dumps to the identical text again. This module imports no
torch and no numpy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from minigpt_cli.config.params import count_parameters
from minigpt_cli.config.schema import Config
from minigpt_cli.config.sources import (
    Source,
    check_layer,
    deep_merge,
    parse_set,
    parse_toml,
    preset_text,
    read_toml_file,
    schema_defaults,
    schema_sections,
    show_value,
    stage_sections,
)
from minigpt_cli.errors import UserError

__all__ = [
    "dump_config",
    "load_config",
    "preset_summary",
    "read_run_config",
]

# Beyond this many problems the message stops listing them (a file with everything misspelt).
_MAX_PROBLEMS = 20


# ----------------------------------------------------------------------------------------------
# Validation errors -> one line each


def _number(value: Any) -> str:
    """3.0 -> "3", 0.5 -> "0.5": bounds read as they were written in the schema."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_TYPE_PHRASES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
    "list_type": "a list",
    "none_required": "unset",
}


def _phrase(error: Mapping[str, Any]) -> str:
    """What is allowed, in words: "must be greater than 0", "must be one of auto, fp32"."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "greater_than":
        return f"must be greater than {_number(ctx['gt'])}"
    if kind == "greater_than_equal":
        return f"must be at least {_number(ctx['ge'])}"
    if kind == "less_than":
        return f"must be less than {_number(ctx['lt'])}"
    if kind == "less_than_equal":
        return f"must be at most {_number(ctx['le'])}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return "must be one of " + ", ".join(choices)
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "finite_number":
        return "must be a finite number"
    if kind in _TYPE_PHRASES:
        return f"must be {_TYPE_PHRASES[kind]}"
    message = str(error.get("msg", kind))
    return message.replace("Input should be", "must be", 1)


def _join_alternatives(phrases: list[str]) -> str:
    """Union errors: ["must be a number", "must be a string"] -> "must be a number or a string"."""
    unique = list(dict.fromkeys(phrases))
    if len(unique) > 1 and all(phrase.startswith("must be ") for phrase in unique):
        return "must be " + " or ".join(phrase.removeprefix("must be ") for phrase in unique)
    return "; ".join(unique)


def _string_hint(section: str, key: str) -> str:
    field = schema_sections()[section].model_fields[key]
    if key == "max_time" or "duration" in (field.description or ""):
        return ' (a duration such as "90s", "10m" or "2h")'
    return ""


@dataclass
class _Provenance:
    """Which source last set each key, and which sources touched each section."""

    keys: dict[tuple[str, str], Source]
    sections: dict[str, Source]

    def of_section(self, *sections: str) -> Source | None:
        found = [self.sections[name] for name in sections if name in self.sections]
        return max(found, key=lambda source: source.rank) if found else None


def _describe_errors(
    error: ValidationError, provenance: _Provenance, section_prefix: str | None = None
) -> list[str]:
    """Translate pydantic's errors into lines that name the source, key, value and the rule."""
    grouped: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        if section_prefix is not None:
            loc = (section_prefix, *loc)
        grouped.setdefault(loc[:2], []).append(item)
    lines: list[str] = []
    for loc, items in grouped.items():
        if len(loc) >= 2 and section_prefix is None:
            section, key = loc
            source = provenance.keys.get((section, key)) or provenance.of_section(section)
            text = _join_alternatives([_phrase(item) for item in items])
            if any(item["type"] == "string_type" for item in items):
                text += _string_hint(section, key)
            value = items[0]["input"]
            if source is None:
                lines.append(f"[{section}] {key} = {show_value(value)}: {text}")
            else:
                lines.append(source.problem(section, key, text, value))
            continue
        section = loc[0] if loc else ""
        text = "; ".join(dict.fromkeys(_phrase(item) for item in items))
        if section_prefix is not None:
            source = provenance.of_section(section_prefix, "train")
            text = f"{text} ([{section_prefix}] laid over [train])"
        else:
            source = provenance.of_section(section)
        if source is None:
            lines.append(f"[{section}] {text}")
        else:
            lines.append(source.problem(section, None, text))
    return lines


def _raise(problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:_MAX_PROBLEMS]
    if len(problems) > _MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - _MAX_PROBLEMS} more problems")
    raise UserError("\n".join(shown))


# ----------------------------------------------------------------------------------------------
# The public API


def load_config(
    preset: str | None = "tiny",
    config_file: Path | str | None = None,
    overrides: Mapping[str, object] | None = None,
    sets: Sequence[str] = (),
) -> Config:
    """Resolve one run's configuration: defaults < preset < file < explicit flags < --set.

    `overrides` maps dotted keys to the values of flags the user gave (`{"pretrain.max_steps":
    10}`); a value of None means the flag was not given and is skipped. `sets` are raw
    `section.key=value` strings. Raises UserError listing every problem found, one per line.
    """
    problems: list[str] = []
    layers: list[tuple[Source, dict[str, dict[str, Any]]]] = []
    rank = 0

    if preset is not None:
        text = preset_text(preset)
        source = Source("preset", f"preset {preset} ({preset}.toml)", rank, text)
        layers.append((source, check_layer(parse_toml(text, f"{preset}.toml"), source, problems)))
    rank += 1

    if config_file is not None:
        path = Path(config_file)
        data, text = read_toml_file(path)
        source = Source("file", str(path), rank, text)
        layers.append((source, check_layer(data, source, problems)))
    rank += 1

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, dot, key = dotted.partition(".")
        if not dot or not section or not key or "." in key:
            raise UserError(f"option {dotted!r}: expected a section.key name")
        rank += 1
        source = Source("flag", f"{dotted} = {show_value(value)}", rank)
        layers.append((source, check_layer({section: {key: value}}, source, problems)))

    for item in sets:
        section, key, value = parse_set(item)
        rank += 1
        source = Source("set", f"--set {item}", rank)
        layers.append((source, check_layer({section: {key: value}}, source, problems)))

    merged = schema_defaults()
    provenance = _Provenance(keys={}, sections={})
    for source, layer in layers:
        deep_merge(merged, layer)
        for section, table in layer.items():
            if table or source.kind == "file":
                provenance.sections[section] = source
            for key in table:
                provenance.keys[(section, key)] = source

    config: Config | None = None
    try:
        config = Config.model_validate(merged, strict=True)
    except ValidationError as error:
        problems.extend(_describe_errors(error, provenance))
    _raise(problems)  # raises whenever validation failed: pydantic reports at least one error
    assert config is not None

    for stage in stage_sections():
        try:
            config.stage_train(stage)
        except ValidationError as error:
            problems.extend(_describe_errors(error, provenance, section_prefix=stage))
    _raise(problems)
    return config


def _section_comment(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


def dump_config(cfg: Config) -> str:
    """The whole resolved configuration as TOML: every section and every key that has a value.

    Keys whose value is None are left out (TOML has no null), which reloads as the schema default.
    The values are re-validated first so the text is canonical: `dump(load(dump(cfg)))` is
    byte-for-byte `dump(cfg)`. Floats are written with `repr`, which round-trips exactly.
    """
    canonical = Config.model_validate(cfg.model_dump(), strict=True)
    data = canonical.model_dump(exclude_none=True)
    lines = [
        "# minigpt configuration, fully resolved: every setting the run uses.",
        "# Load it with `--config FILE`. Keys not listed are unset (None) and take their default.",
        "",
    ]
    sections = schema_sections()
    for name, table in data.items():
        comment = _section_comment(sections[name])
        if comment:
            lines.append(f"# {comment}")
        body = tomli_w.dumps({name: table}).rstrip("\n")
        lines.append(body)
        lines.append("")
    return "\n".join(lines)


RUN_CONFIG_FILE = "config.toml"  # a run's resolved config (engine/runs/files.py names it too)


# Keys whose default changed the training itself, with the value a saved run that does not list
# them was trained with: it resumes as it was configured, not with today's default.
SAVED_RUN_DEFAULTS: dict[str, object] = {
    "sft.text_mix": 0.0,  # before SFT rehearsed pretraining text
    "rlhf.target_kl": 0.0,  # before PPO's KL control was adaptive by default (0 = fixed)
    "rlhf.kl_control": "target",  # before the ceiling controller: Ziegler's, both ways
}


def read_run_config(run_dir: Path | str) -> Config:
    """The configuration a run was trained with (`RUN/config.toml`), validated like any file;
    keys an older version did not write take what that version used (`SAVED_RUN_DEFAULTS`)."""
    run = Path(run_dir)
    path = run / RUN_CONFIG_FILE
    if not run.is_dir() or not path.is_file():
        raise UserError(f"{run} is not a run directory (no {RUN_CONFIG_FILE})")
    return load_config(preset=None, config_file=path, overrides=saved_run_defaults(path))


def saved_run_defaults(path: Path) -> dict[str, object]:
    """The `SAVED_RUN_DEFAULTS` a saved run config does not list, as `load_config` overrides
    (flags given on top of them still win: put them after)."""
    data, _ = read_toml_file(path)
    return {
        dotted: value
        for dotted, value in SAVED_RUN_DEFAULTS.items()
        if dotted.partition(".")[2] not in (data.get(dotted.partition(".")[0]) or {})
    }


def preset_summary(name: str) -> dict[str, Any]:
    """A preset's shape, training budget and parameter count."""
    cfg = load_config(preset=name)
    model = cfg.model
    train = cfg.stage_train("pretrain")
    summary: dict[str, Any] = {
        "name": name,
        "n_layer": model.n_layer,
        "n_embd": model.n_embd,
        "n_head": model.n_head,
        "n_kv_head": model.kv_heads,
        "ffn_dim": model.ffn_dim,
        "vocab_size": cfg.tokenizer.vocab_size,
        "context_length": model.context_length,
        "learning_rate": train.learning_rate,
        "max_steps": train.max_steps,
        "global_batch_size": train.global_batch_size,
        "micro_batch_size": train.micro_batch_size,
        "parameters": int(count_parameters(model, cfg.tokenizer.vocab_size)),
    }
    return summary
