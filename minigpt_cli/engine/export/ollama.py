"""The Ollama `Modelfile` written beside a GGUF export: `ollama create NAME -f FILE.Modelfile`.

It says what Ollama cannot read from the GGUF file itself:

- `FROM ./FILE.gguf`, relative to the Modelfile (Ollama resolves it from the Modelfile's folder),
  so the pair can be moved together;
- `TEMPLATE`, the prompt layout in Ollama's Go-template syntax. A chat run gets minigpt's chat
  template over Ollama's message list, each message `<|role|>content<|end_of_turn|>` and then
  `<|assistant|>` for the reply. The leading `<|begin_of_text|>` is not in it: the GGUF file
  declares it as the BOS that Ollama adds to every prompt (`gguf_file`), so writing it here would
  put it there twice. A run that is not chat-tuned gets the bare prompt (the BOS Ollama adds is
  then the `<|end_of_text|>` a document follows in pretraining, as in `minigpt generate`);
- `PARAMETER stop` for the tokens minigpt stops at, and the run's `[generate]` defaults
  (temperature, top-k, top-p, repetition penalty, reply length; min-p 0 since minigpt has none),
  with `num_ctx` the model's context length: Ollama's default (2048 or more) exceeds what the
  rotary table was trained for on every minigpt preset.

Ollama's TEMPLATE sees Ollama's roles; minigpt's template knows system, user and assistant, and
this one writes any other role (a tool result) as `<|role|>` text, which the model never saw.
"""

from __future__ import annotations

from pathlib import Path

from minigpt_cli.engine.data.tokenizer import SPECIAL_TOKENS
from minigpt_cli.engine.export.gguf_file import sampling_defaults
from minigpt_cli.engine.export.source import ExportSource

SUFFIX = ".Modelfile"

CHAT_TEMPLATE = (
    "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}"
    + SPECIAL_TOKENS["eot"]
    + "{{ end }}"
    + SPECIAL_TOKENS["assistant"]
)
"""minigpt's chat template (`data/chat_template.py`) after the BOS, in Ollama's syntax."""

COMPLETION_TEMPLATE = "{{ .Prompt }}"
"""A model that continues text: the prompt as it is."""


def modelfile_path(gguf_path: Path) -> Path:
    """Where the Modelfile of `gguf_path` goes: beside it, named after it (`tiny.gguf` ->
    `tiny.Modelfile`), so several exports can share a folder."""
    return gguf_path.with_suffix(SUFFIX)


def _number(value: float) -> str:
    return f"{value:g}"


def modelfile(source: ExportSource, gguf_name: str) -> str:
    """The Modelfile's text for `source` exported as `gguf_name` (a file in the same folder)."""
    generate = source.config.generate
    sampling = sampling_defaults(generate)
    template = CHAT_TEMPLATE if source.chat else COMPLETION_TEMPLATE
    lines = [
        f"# Ollama model of the minigpt run {source.run_dir.resolve().name}, written by "
        "`minigpt export --format gguf`.",
        f"# Use: ollama create NAME -f {Path(gguf_name).with_suffix(SUFFIX).name} "
        "&& ollama run NAME",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
    ]
    stops = (
        [SPECIAL_TOKENS["eot"], SPECIAL_TOKENS["eos"]] if source.chat else [SPECIAL_TOKENS["eos"]]
    )
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines += [
        f"PARAMETER temperature {_number(sampling['temperature'])}",
        f"PARAMETER top_k {sampling['top_k']}",
        f"PARAMETER top_p {_number(sampling['top_p'])}",
        f"PARAMETER min_p {_number(sampling['min_p'])}",
        f"PARAMETER repeat_penalty {_number(sampling['repeat_penalty'])}",
        f"PARAMETER num_predict {generate.max_new_tokens}",
        f"PARAMETER num_ctx {source.config.model.context_length}",
    ]
    return "\n".join(lines) + "\n"
