"""Where configuration comes from, one source at a time: a preset, a TOML file, a flag, a --set.

Each source is read and checked on its own (unknown sections and keys, TOML syntax) before any
merging, which is what lets a message name the file and line a bad value came from. `loader.py`
lays the checked layers over the schema defaults and validates the result once.
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

from pydantic import BaseModel

from minigpt_cli.config import PRESETS
from minigpt_cli.config.schema import Config, StageTrainConfig
from minigpt_cli.errors import UserError, location

_TOML_POSITION = re.compile(r"^(?P<message>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$")
_TOML_AT_END = re.compile(r"^(?P<message>.*?)\s*\(at end of document\)$")


# ----------------------------------------------------------------------------------------------
# Schema introspection


@functools.cache
def schema_sections() -> dict[str, type[BaseModel]]:
    """Section name -> its pydantic model, in the order they appear in `Config`."""
    sections: dict[str, type[BaseModel]] = {}
    for name, field in Config.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections[name] = annotation
    return sections


def stage_sections() -> list[str]:
    """Sections that override [train] for one stage (`Config.stage_train` merges them)."""
    return [
        name for name, model in schema_sections().items() if issubclass(model, StageTrainConfig)
    ]


def _accepted_types(section: str, key: str) -> set[type]:
    """The plain Python types a field's annotation lists (`str | None` -> {str, NoneType})."""
    annotation = schema_sections()[section].model_fields[key].annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return {arg for arg in typing.get_args(annotation) if isinstance(arg, type)}
    return {annotation} if isinstance(annotation, type) else set()


# ----------------------------------------------------------------------------------------------
# Sources: where each value came from, so an error can point there


@dataclass(frozen=True)
class Source:
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
        return f"{where}: [{section}] {key} = {show_value(value)}: {text}"

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


def show_value(value: Any) -> str:
    """A value the way the user would have typed it in TOML (strings quoted, true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {show_value(v)}" for k, v in value.items()) + "}"
    return str(value)


# ----------------------------------------------------------------------------------------------
# Reading TOML


def read_toml_file(path: Path, what: str = "config file") -> tuple[dict[str, Any], str]:
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
    return parse_toml(data, str(path)), _decode(data, str(path))


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


def parse_toml(data: bytes | str, label: str) -> dict[str, Any]:
    """TOML tables of `data`; a syntax error is a UserError at `label:line:column`."""
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


def preset_text(name: str) -> str:
    """The TOML text of a built-in preset; an unknown name is a UserError with a suggestion."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)}{hint})")
    resource = importlib.resources.files("minigpt_cli.config") / "presets" / f"{name}.toml"
    return resource.read_text(encoding="utf-8")


def load_preset(name: str) -> dict[str, Any]:
    """The raw TOML tables of a built-in preset (not validated, not merged with defaults)."""
    return parse_toml(preset_text(name), f"{name}.toml")


# ----------------------------------------------------------------------------------------------
# Checking a layer's shape (unknown sections and keys) and merging


def _suggest(name: str, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _owners(key: str) -> list[str]:
    """Sections that have a key of this name (for "it belongs in [train]" hints)."""
    return [name for name, model in schema_sections().items() if key in model.model_fields]


def check_layer(
    layer: Mapping[str, Any], source: Source, problems: list[str]
) -> dict[str, dict[str, Any]]:
    """Keep the known sections and keys of one layer; report the rest into `problems`."""
    sections = schema_sections()
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
                    section,
                    None,
                    f"'{section}' must be a table ([{section}]), got {show_value(table)}",
                )
            )
            continue
        fields = sections[section].model_fields
        kept: dict[str, Any] = {}
        for key, value in table.items():
            if key in fields:
                kept[key] = _coerce(section, key, value)
                continue
            # A key another section has exactly says more than a near miss in this one
            # ([model] vocab_size is [tokenizer]'s, not a misspelt head_size).
            elsewhere = [owner for owner in _owners(key) if owner != section]
            close = None if elsewhere else _suggest(key, list(fields))
            if elsewhere:
                hint = f" (it belongs in [{elsewhere[0]}])"
            else:
                hint = f" (did you mean '{close}'?)" if close else ""
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


def deep_merge(base: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Lay `layer` over `base` in place: tables merge key by key, anything else replaces."""
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value


def schema_defaults() -> dict[str, dict[str, Any]]:
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
