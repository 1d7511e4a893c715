"""Turn presets, a TOML file, CLI flags and `--set` strings into one validated `Config`.

Layers, lowest precedence first: schema defaults < preset < `--config FILE` < explicit flags
(`overrides`) < `--set section.key=value`. Each layer is checked for unknown sections and keys on
its own (so the message can name the file and line it came from), the layers are merged section
by section, and the result is validated once. Every problem becomes a `UserError` whose lines
each say where the bad value came from, what it was, and what is allowed.

`dump_config` writes the inverse: the fully resolved TOML that `load_config(None, that_file)` turns
back into an equal `Config`, and that dumps to the identical text again. This module imports no
torch and no numpy.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from minigpt_cli.config import PRESETS
from minigpt_cli.config.schema import Config, StageTrainConfig
from minigpt_cli.errors import UserError, location

__all__ = [
    "PRESETS",
    "dump_config",
    "load_config",
    "load_preset",
    "parse_set",
    "preset_summary",
    "read_run_config",
]

# Beyond this many problems the message stops listing them (a file with everything misspelt).
_MAX_PROBLEMS = 20

_TOML_POSITION = re.compile(r"^(?P<message>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$")
_TOML_AT_END = re.compile(r"^(?P<message>.*?)\s*\(at end of document\)$")


# ----------------------------------------------------------------------------------------------
# Schema introspection


@functools.cache
def _sections() -> dict[str, type[BaseModel]]:
    """Section name -> its pydantic model, in the order they appear in `Config`."""
    sections: dict[str, type[BaseModel]] = {}
    for name, field in Config.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections[name] = annotation
    return sections


def _stage_sections() -> list[str]:
    """Sections that override [train] for one stage (`Config.stage_train` merges them)."""
    return [name for name, model in _sections().items() if issubclass(model, StageTrainConfig)]


def _accepted_types(section: str, key: str) -> set[type]:
    """The plain Python types a field's annotation lists (`str | None` -> {str, NoneType})."""
    annotation = _sections()[section].model_fields[key].annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return {arg for arg in typing.get_args(annotation) if isinstance(arg, type)}
    return {annotation} if isinstance(annotation, type) else set()


# ----------------------------------------------------------------------------------------------
# Sources: where each value came from, so an error can point there


@dataclass(frozen=True)
class _Source:
    """One layer of configuration: a preset, a file, the explicit flags, or one --set."""

    kind: str  # "preset" | "file" | "flag" | "set"
    label: str  # what the user recognises: the path, "--set a.b=c", ...
    rank: int  # precedence; higher wins
    text: str | None = None  # TOML text, to find line numbers

    def line_of(self, section: str, key: str | None = None) -> int | None:
        """Best-effort line number of `[section]` or of `key` inside it (files only)."""
        if self.kind != "file" or self.text is None:
            return None
        return _find_line(self.text, section, key)

    def problem(self, section: str, key: str | None, text: str, value: Any = None) -> str:
        """One line: where it came from, which key (and value), and what is wrong."""
        if key is None:  # a cross-field rule: name the section
            if self.kind in ("set", "flag"):
                return f"{self.label}: [{section}] {text}"
            return f"{location(self.label, self.line_of(section))}: [{section}] {text}"
        if self.kind in ("set", "flag"):  # the label already shows the key and value
            return f"{self.label}: {text}"
        where = location(self.label, self.line_of(section, key))
        return f"{where}: [{section}] {key} = {_show(value)}: {text}"

    def structural(self, section: str | None, key: str | None, text: str) -> str:
        """An unknown section or key: the message already names it."""
        if self.kind in ("set", "flag"):
            return f"{self.label}: {text}"
        line = self.line_of(section, key) if section is not None else None
        if line is None and self.kind == "file" and self.text is not None:
            line = _find_line(self.text, None, key or section)
        return f"{location(self.label, line)}: {text}"


_HEADER = re.compile(r"^\s*\[\[?\s*(?P<name>[^\]]+?)\s*\]\]?\s*(#.*)?$")


def _unquote_dotted(name: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in name.split("."))


def _find_line(text: str, section: str | None, key: str | None) -> int | None:
    """Where `[section]` (key None) or `key` in it is written; None when not found.

    A heuristic, good for the usual layouts (`[train]` then `key = value`, dotted `train.key = v`
    at top level, `[train.key]`); a miss only drops the line number from the message.
    """
    current: str | None = None
    key_pattern = dotted_pattern = section_pattern = None
    if section is not None:
        sec = rf"(?:{re.escape(section)}|\"{re.escape(section)}\"|'{re.escape(section)}')"
        section_pattern = re.compile(rf"^\s*{sec}\s*\.")
    if key is not None:
        quoted = rf"(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
        key_pattern = re.compile(rf"^\s*{quoted}\s*[=.]")
        if section is not None:
            dotted_pattern = re.compile(rf"^\s*{sec}\s*\.\s*{quoted}\s*[=.]")
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            current = _unquote_dotted(header.group("name"))
            if key is None and section is not None and current.split(".")[0] == section:
                return number
            if key is not None and section is not None and current == f"{section}.{key}":
                return number
            continue
        if key is None or key_pattern is None:
            if current is None and section_pattern is not None and section_pattern.match(line):
                return number  # `section.key = value` written at top level
            continue
        if current == section and key_pattern.match(line):
            return number
        if current is None and dotted_pattern is not None and dotted_pattern.match(line):
            return number
    return None


def _show(value: Any) -> str:
    """A value the way the user would have typed it in TOML (strings quoted, true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _number(value: Any) -> str:
    """3.0 -> "3", 0.5 -> "0.5": bounds read as they were written in the schema."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ----------------------------------------------------------------------------------------------
# Reading TOML


def _read_toml_file(path: Path, what: str = "config file") -> tuple[dict[str, Any], str]:
    """Parse a TOML file; every way it can fail is one UserError naming the path."""
    if not path.exists():
        raise UserError(f"{path}: no such {what}")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a TOML {what}")
    try:
        data = path.read_bytes()
    except PermissionError as error:
        raise UserError(f"{path}: cannot read {what} (permission denied)") from error
    except OSError as error:
        raise UserError(f"{path}: cannot read {what} ({error.strerror or error})") from error
    return _parse_toml(data, str(path)), _decode(data, str(path))


def _decode(data: bytes, label: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        byte = data[error.start : error.start + 1].hex()
        raise UserError(
            f"{location(label, line, column)}: not valid UTF-8 (byte 0x{byte}); "
            "save the file as UTF-8"
        ) from error
    # A UTF-8 byte-order mark (Windows editors add one) is not part of the TOML text.
    return text.removeprefix("\ufeff")


def _parse_toml(data: bytes | str, label: str) -> dict[str, Any]:
    text = data if isinstance(data, str) else _decode(data, label)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        match = _TOML_POSITION.match(message)
        if match:
            line, column = int(match.group("line")), int(match.group("col"))
            message = match.group("message")
        else:
            at_end = _TOML_AT_END.match(message)
            if at_end:
                message = at_end.group("message") + " (at end of file)"
            line = text.count("\n") + 1
            column = len(text) - (text.rfind("\n") + 1) + 1
        raise UserError(f"{location(label, line, column)}: {message}") from error


def _preset_text(name: str) -> str:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)}{hint})")
    resource = importlib.resources.files("minigpt_cli.config") / "presets" / f"{name}.toml"
    return resource.read_text(encoding="utf-8")


def load_preset(name: str) -> dict[str, Any]:
    """The raw TOML tables of a built-in preset (not validated, not merged with defaults)."""
    return _parse_toml(_preset_text(name), f"{name}.toml")


# ----------------------------------------------------------------------------------------------
# Checking a layer's shape (unknown sections and keys) and merging


def _suggest(name: str, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _owners(key: str) -> list[str]:
    """Sections that have a key of this name (for "it belongs in [train]" hints)."""
    return [name for name, model in _sections().items() if key in model.model_fields]


def _check_layer(
    layer: Mapping[str, Any], source: _Source, problems: list[str]
) -> dict[str, dict[str, Any]]:
    """Keep the known sections and keys of one layer; report the rest into `problems`."""
    sections = _sections()
    clean: dict[str, dict[str, Any]] = {}
    for section, table in layer.items():
        if section not in sections:
            if not isinstance(table, dict):
                owners = _owners(section)
                if owners:
                    hint = " or ".join(f"[{owner}]" for owner in owners)
                    if "train" in owners:  # every stage section repeats the [train] keys
                        hint = "[train], or a stage section such as [pretrain] for one stage"
                    text = f"key '{section}' must be inside a section (it belongs in {hint})"
                else:
                    text = f"unknown top-level key '{section}' (settings go in sections: "
                    text += ", ".join(f"[{name}]" for name in sections) + ")"
                problems.append(source.structural(None, section, text))
                continue
            close = _suggest(section, list(sections))
            hint = f" (did you mean [{close}]?)" if close else ""
            hint = hint or f" (known sections: {', '.join(sections)})"
            problems.append(source.structural(section, None, f"unknown section [{section}]{hint}"))
            continue
        if not isinstance(table, dict):
            problems.append(
                source.structural(
                    section, None, f"'{section}' must be a table ([{section}]), got {_show(table)}"
                )
            )
            continue
        fields = sections[section].model_fields
        kept: dict[str, Any] = {}
        for key, value in table.items():
            if key in fields:
                kept[key] = _coerce(section, key, value)
                continue
            close = _suggest(key, list(fields))
            if close:
                hint = f" (did you mean '{close}'?)"
            else:
                elsewhere = [owner for owner in _owners(key) if owner != section]
                hint = f" (it belongs in [{elsewhere[0]}])" if elsewhere else ""
            problems.append(
                source.structural(section, key, f"unknown key '{key}' in [{section}]{hint}")
            )
        clean[section] = kept
    return clean


def _coerce(section: str, key: str, value: Any) -> Any:
    """A number given for a string-only field (`max_time = 600`) becomes its text ("600").

    Durations and the like are strings in the schema because they carry units, but a bare number
    of seconds is what people type; everything else is validated strictly, as TOML is typed.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        accepted = _accepted_types(section, key)
        if str in accepted and not accepted & {int, float}:
            return str(value)
    return value


def _deep_merge(base: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Lay `layer` over `base` in place: tables merge key by key, anything else replaces."""
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _defaults() -> dict[str, dict[str, Any]]:
    """Every key with its schema default, so every value (defaults too) is validated alike."""
    return Config().model_dump()


# ----------------------------------------------------------------------------------------------
# --set and explicit flags


def parse_set(item: str) -> tuple[str, str, Any]:
    """Split `section.key=value`; the value is read as a TOML value, else kept as a bare string.

    `3e-4` -> float, `true` -> bool, `"x"` -> str, `[1, 2]` -> list, `10m` -> "10m".
    """
    name, sep, raw = item.partition("=")
    parts = name.strip().split(".")
    if not sep or len(parts) != 2 or not all(part.strip() for part in parts):
        raise UserError(f"--set {item}: expected section.key=value")
    section, key = (part.strip() for part in parts)
    return section, key, _toml_value(raw.strip())


def _toml_value(raw: str) -> Any:
    if "\n" in raw or "\r" in raw:
        return raw
    try:
        parsed = tomllib.loads(f"value = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    return parsed["value"] if list(parsed) == ["value"] else raw


# ----------------------------------------------------------------------------------------------
# Validation errors -> one line each


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
    field = _sections()[section].model_fields[key]
    if key == "max_time" or "duration" in (field.description or ""):
        return ' (a duration such as "90s", "10m" or "2h")'
    return ""


@dataclass
class _Provenance:
    """Which source last set each key, and which sources touched each section."""

    keys: dict[tuple[str, str], _Source]
    sections: dict[str, _Source]

    def of_section(self, *sections: str) -> _Source | None:
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
                lines.append(f"[{section}] {key} = {_show(value)}: {text}")
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
    layers: list[tuple[_Source, dict[str, dict[str, Any]]]] = []
    rank = 0

    if preset is not None:
        text = _preset_text(preset)
        source = _Source("preset", f"preset {preset} ({preset}.toml)", rank, text)
        layers.append((source, _check_layer(_parse_toml(text, f"{preset}.toml"), source, problems)))
    rank += 1

    if config_file is not None:
        path = Path(config_file)
        data, text = _read_toml_file(path)
        source = _Source("file", str(path), rank, text)
        layers.append((source, _check_layer(data, source, problems)))
    rank += 1

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, dot, key = dotted.partition(".")
        if not dot or not section or not key or "." in key:
            raise UserError(f"option {dotted!r}: expected a section.key name")
        rank += 1
        source = _Source("flag", f"{dotted} = {_show(value)}", rank)
        layers.append((source, _check_layer({section: {key: value}}, source, problems)))

    for item in sets:
        section, key, value = parse_set(item)
        rank += 1
        source = _Source("set", f"--set {item}", rank)
        layers.append((source, _check_layer({section: {key: value}}, source, problems)))

    merged = _defaults()
    provenance = _Provenance(keys={}, sections={})
    for source, layer in layers:
        _deep_merge(merged, layer)
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

    for stage in _stage_sections():
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
    sections = _sections()
    for name, table in data.items():
        comment = _section_comment(sections[name])
        if comment:
            lines.append(f"# {comment}")
        body = tomli_w.dumps({name: table}).rstrip("\n")
        lines.append(body)
        lines.append("")
    return "\n".join(lines)


def read_run_config(run_dir: Path | str) -> Config:
    """The configuration a run was trained with (`RUN/config.toml`), validated like any file."""
    run = Path(run_dir)
    path = run / "config.toml"
    if not run.is_dir() or not path.is_file():
        raise UserError(f"{run} is not a run directory (no config.toml)")
    return load_config(preset=None, config_file=path)


def preset_summary(name: str) -> dict[str, Any]:
    """A preset's shape, training budget and parameter count (None when it cannot be computed)."""
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
        "parameters": None,
    }
    try:
        from minigpt_cli.config.params import count_parameters
    except ImportError:
        return summary
    summary["parameters"] = int(count_parameters(model, cfg.tokenizer.vocab_size))
    return summary
