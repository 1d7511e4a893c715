"""Records in the stage formats: every accepted shape of a record, normalised into one per kind.

A stage sees one shape whatever the source (a `--data` file or the built-in data), so no stage
special-cases a format, and every malformed record is a `RecordError` saying what is wrong (the
file readers in `files.py` add `path:line`).

Formats (README "Training on your own text"):

- pretrain: `.txt` (a whole file is one document; streamed in chunks of about 1 MB cut at line ends,
  so a file of any size reads in bounded memory) and JSONL with one `{"text": ...}` document a line.
- sft: `{"instruction", "input"?, "output", "history"?, "system"?}`, `{"prompt", "completion"}`,
  `{"messages": [{"role", "content"}, ...]}`; all become `{"messages": [...], "task"}`.
- dpo (and reward): `{"prompt", "chosen", "rejected"}`; a prompt in `Human: ... Assistant:` form is
  split into turns. Full Anthropic-HH transcripts without a prompt field are split too. All become
  `{"prompt_messages": [...], "chosen", "rejected", "task"}`.
- rlhf: `{"prompt", "answer"?}` -> `{"prompt_messages": [...], "answer": str | None, "task"}`.

Unknown extra fields are ignored.
"""

from __future__ import annotations

import re
from typing import Any, Literal, overload

from minigpt_cli.datasets import builtin
from minigpt_cli.engine.data.chat_template import role_problem
from minigpt_cli.errors import UserError

KINDS = ("pretrain", "sft", "dpo", "reward", "rlhf")
ROLES = ("system", "user", "assistant")

_EXPECTED = {
    "pretrain": 'a .txt file, or JSONL with one {"text": ...} object a line',
    "sft": (
        'an object with "instruction" and "output" (optional "input", "history"), '
        'or "prompt" and "completion", or "messages"'
    ),
    "dpo": 'an object with "prompt", "chosen" and "rejected"',
    "reward": 'an object with "prompt", "chosen" and "rejected"',
    "rlhf": 'an object with "prompt" (and optionally "answer")',
}


class RecordError(ValueError):
    """One record is malformed; the message says how (the caller adds `path:line`)."""


def check_kind(kind: str) -> None:
    """A `UserError` unless `kind` is one of `KINDS`: what a reader checks first."""
    if kind not in KINDS:
        raise UserError(f"unknown data kind {kind!r} (expected one of {', '.join(KINDS)})")


def json_type(value: Any) -> str:
    """How a JSON value's type reads in a message: "a string", "an array", "null", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# A required field comes back as a string; only an optional one can be None.
@overload
def _string(
    obj: dict, key: str, *, required: Literal[True] = ..., allow_empty: bool = ..., needs: str = ...
) -> str: ...
@overload
def _string(
    obj: dict, key: str, *, required: bool, allow_empty: bool = ..., needs: str = ...
) -> str | None: ...
def _string(
    obj: dict, key: str, *, required: bool = True, allow_empty: bool = True, needs: str = ""
) -> str | None:
    """`obj[key]`, checked to be a string; `needs` says what the format needs when it is missing."""
    if key not in obj or obj[key] is None:
        if required:
            raise RecordError(f"missing field '{key}'" + (f" ({needs})" if needs else ""))
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, got {json_type(value)}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field '{key}' is empty")
    return value


def _task(obj: dict) -> str | None:
    return _string(obj, "task", required=False)


_HH_TURN = re.compile(r"(?:^|\n)[ \t]*(Human|Assistant):[ \t]?")


def looks_like_human_assistant(text: str) -> bool:
    """Whether `text` is an Anthropic-HH style transcript (`Human: ... Assistant: ...`)."""
    return text.lstrip().startswith("Human:") and "Assistant:" in text


def split_human_assistant(text: str) -> list[dict[str, str]]:
    """Turn `Human: ... Assistant: ...` text into chat messages.

    The empty `Assistant:` at the end (where the reply goes) is dropped, so a prompt becomes the
    conversation so far, ending with the user's turn. Two turns of the same speaker in a row (real
    transcripts have them, e.g. where a marker was written inline and the speaker went on) are one
    turn, so the conversation alternates as the chat template requires.
    """
    pieces = _HH_TURN.split(text.strip())
    turns: list[dict[str, str]] = []
    lead = pieces[0].strip()
    if lead:
        turns.append({"role": "system", "content": lead})
    for speaker, content in zip(pieces[1::2], pieces[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        turns.append({"role": role, "content": content.strip()})
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    messages: list[dict[str, str]] = []
    for turn in turns:
        if messages and messages[-1]["role"] == turn["role"]:
            parts = (messages[-1]["content"], turn["content"])
            messages[-1] = {"role": turn["role"], "content": "\n\n".join(p for p in parts if p)}
        else:
            messages.append(turn)
    return messages


def _prompt_messages(prompt: str) -> list[dict[str, str]]:
    if looks_like_human_assistant(prompt):
        messages = split_human_assistant(prompt)
        if not messages or messages[-1]["role"] != "user":
            raise RecordError("the prompt must end with the user's turn (then 'Assistant:')")
        return messages
    return [{"role": "user", "content": prompt}]


def _check_messages(value: Any, field: str = "messages") -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordError(f"field '{field}' must be an array of messages, got {json_type(value)}")
    if not value:
        raise RecordError(f"field '{field}' is empty")
    out = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise RecordError(f"{where} must be an object, got {json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise RecordError(f"{where} is missing '{key}'")
            if not isinstance(message[key], str):
                got = json_type(message[key])
                raise RecordError(f"{where}: '{key}' must be a string, got {got}")
        if message["role"] not in ROLES:
            raise RecordError(
                f"{where}: unknown role {message['role']!r} (expected system, user or assistant)"
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _normalise_sft(obj: dict) -> dict:
    task = _task(obj)
    if "messages" in obj:
        messages = _check_messages(obj["messages"])
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("'messages' has no assistant message to learn from")
        if messages[-1]["role"] != "assistant":
            raise RecordError("the last message must be the assistant's")
        if not messages[-1]["content"].strip():
            raise RecordError("the last assistant message is empty")
        problem = role_problem(messages)  # the chat template's rule, reported with the line
        if problem:
            raise RecordError(problem)
        return {"messages": messages, "task": task}
    if "instruction" in obj or "output" in obj:
        needs = "instruction records need 'instruction' and 'output'; 'input', 'history' optional"
        instruction = _string(obj, "instruction", needs=needs)
        input_text = _string(obj, "input", required=False) or ""
        output = _string(obj, "output", allow_empty=False, needs=needs)
        user = builtin.join_instruction(instruction or "", input_text)
        if not user.strip():
            raise RecordError("fields 'instruction' and 'input' are both empty")
        messages = _system_message(obj)
        messages += _history(obj.get("history"))
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return {"messages": messages, "task": task}
    if "prompt" in obj or "completion" in obj:
        needs = "prompt/completion records need both 'prompt' and 'completion'"
        prompt = _string(obj, "prompt", allow_empty=False, needs=needs)
        completion = _string(obj, "completion", allow_empty=False, needs=needs)
        messages = _system_message(obj) + _prompt_messages(prompt or "")
        messages.append({"role": "assistant", "content": completion or ""})
        return {"messages": messages, "task": task}
    raise _unknown_format(obj, "sft")


def _system_message(obj: dict) -> list[dict[str, str]]:
    system = _string(obj, "system", required=False)
    return [{"role": "system", "content": system}] if system else []


def _history(value: Any) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError(
            f"field 'history' must be an array of [user, assistant] pairs, got {json_type(value)}"
        )
    messages = []
    for index, turn in enumerate(value):
        if (
            not isinstance(turn, list)
            or len(turn) != 2
            or not all(isinstance(part, str) for part in turn)
        ):
            raise RecordError(f"history[{index}] must be a pair of strings [user, assistant]")
        messages += [
            {"role": "user", "content": turn[0]},
            {"role": "assistant", "content": turn[1]},
        ]
    return messages


def _split_transcript(text: str, field: str) -> tuple[str, str]:
    marker = text.rfind("Assistant:")
    if marker < 0:
        raise RecordError(f"field '{field}' has no 'Assistant:' turn")
    end = marker + len("Assistant:")
    return text[:end], text[end:].strip()


def _normalise_pair(obj: dict, kind: str) -> dict:
    if "chosen" not in obj and "rejected" not in obj and "prompt" not in obj:
        raise _unknown_format(obj, kind)
    task = _task(obj)
    needs = f"{kind} records need 'prompt', 'chosen' and 'rejected'"
    chosen = _string(obj, "chosen", needs=needs)
    rejected = _string(obj, "rejected", needs=needs)
    assert chosen is not None and rejected is not None
    if "prompt" in obj and obj["prompt"] is not None:
        prompt = _string(obj, "prompt", allow_empty=False)
        assert prompt is not None
        if looks_like_human_assistant(prompt):
            if chosen.startswith(prompt) and rejected.startswith(prompt):  # whole transcripts
                chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
            chosen, rejected = chosen.strip(), rejected.strip()
    elif looks_like_human_assistant(chosen) and looks_like_human_assistant(rejected):
        prompt, chosen = _split_transcript(chosen, "chosen")
        other_prompt, rejected = _split_transcript(rejected, "rejected")
        if prompt.strip() != other_prompt.strip():
            raise RecordError("'chosen' and 'rejected' continue different conversations")
    else:
        raise RecordError(f"missing field 'prompt' ({needs})")
    if not chosen.strip():
        raise RecordError("field 'chosen' is empty")
    if not rejected.strip():
        raise RecordError("field 'rejected' is empty")
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are identical: nothing to prefer")
    return {
        "prompt_messages": _prompt_messages(prompt),
        "chosen": chosen,
        "rejected": rejected,
        "task": task,
    }


def _normalise_rlhf(obj: dict) -> dict:
    if "prompt" not in obj:
        if "instruction" in obj or "messages" in obj or "chosen" in obj:
            raise RecordError('missing field \'prompt\' (rlhf records are {"prompt", "answer"?})')
        raise _unknown_format(obj, "rlhf")
    task = _task(obj)
    prompt = _string(obj, "prompt", allow_empty=False)
    answer = obj.get("answer")
    if isinstance(answer, bool) or not (answer is None or isinstance(answer, str | int | float)):
        raise RecordError(f"field 'answer' must be a string or a number, got {json_type(answer)}")
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    return {"prompt_messages": _prompt_messages(prompt or ""), "answer": answer, "task": task}


def normalise_text(obj: dict) -> dict:
    """A pretraining JSONL object as `{"text", "task"}` (CRLF line ends become LF)."""
    if "text" not in obj:
        raise RecordError(
            "missing field 'text' (pretraining JSONL needs one {\"text\": ...} object a line)"
        )
    text = _string(obj, "text")
    return {"text": (text or "").replace("\r\n", "\n"), "task": _task(obj)}


def _unknown_format(obj: dict, kind: str) -> RecordError:
    fields = ", ".join(f"'{key}'" for key in list(obj)[:8]) or "none"
    return RecordError(
        f"unknown {kind} record format (fields: {fields}); expected {_EXPECTED[kind]}"
    )


def normalise_record(obj: Any, kind: str) -> dict:
    """The canonical form of one record of `kind`, or `RecordError` saying what is wrong.

    sft -> `{"messages", "task"}`; dpo/reward -> `{"prompt_messages", "chosen", "rejected",
    "task"}`; rlhf -> `{"prompt_messages", "answer", "task"}`; pretrain -> `{"text", "task"}`.
    `task` is None when the record has none. Built-in records go through here too, so a stage
    sees one shape whatever the source.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r} (expected one of {', '.join(KINDS)})")
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {json_type(obj)}")
    try:
        if kind == "pretrain":
            return normalise_text(obj)
        if kind == "sft":
            return _normalise_sft(obj)
        if kind in ("dpo", "reward"):
            return _normalise_pair(obj, kind)
        return _normalise_rlhf(obj)
    except RecordError as error:
        guess = _guess_kind(obj)
        if guess is not None and guess != kind and {guess, kind} != {"dpo", "reward"}:
            raise RecordError(f"{error}; this looks like {guess} data") from None
        raise


def _guess_kind(obj: dict) -> str | None:
    """Which kind of data a record looks like, to say so when it was given as another kind."""
    if "chosen" in obj and "rejected" in obj:
        return "dpo"
    if "messages" in obj or "output" in obj or "completion" in obj:
        return "sft"
    if "prompt" in obj and "answer" in obj:
        return "rlhf"
    if "text" in obj and not {"prompt", "instruction"} & set(obj):
        return "pretrain"
    return None
