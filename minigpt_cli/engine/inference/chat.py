"""A chat session's memory, with no terminal in it: history, fitting it to the context, `/set`.

`minigpt chat` is a REPL around three decisions that deserve tests of their own, so they live here
rather than in the CLI:

- What the model sees. A chat-tuned run gets the conversation in the one chat template
  (`chat_template.prompt_ids`), so a single question is exactly what `generate` builds for it. A
  run that was only pretrained knows no turns: the conversation is plain text (the system text,
  then each input on a new line followed by the model's continuation), fed as a document start
  (end-of-text id first), again exactly what `generate` feeds for one input.
- What is forgotten. The prompt must leave room for the answer inside the context window, so the
  oldest exchanges are dropped first (for good: the history only grows, so a turn that no longer
  fits would rarely fit again, and keeping it would make every prompt re-encode it); the system
  prompt always stays. A single message too long even alone is cut from the left (its end is what
  the model should answer), and the plan says so.
- What `/set NAME VALUE` means for each sampling knob, with bad input reported as a `UserError`
  line rather than a crash.

No torch here: the CLI feeds the plan's ids to `inference.decode.generate_batch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from minigpt_cli.engine.data.chat_template import ChatTokenizer, prompt_ids, render
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# Knobs `/set` changes, in the order /help and `/set` list them.
SETTING_NAMES = (
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "max_new_tokens",
    "seed",
    "greedy",
)

# `/set max_new_tokens` above this is refused: generation allocates its token buffer up front, so a
# typo with extra zeros would try to allocate gigabytes rather than just run long.
MAX_NEW_TOKENS_LIMIT = 1_000_000

_OFF_WORDS = ("off", "none", "no")
_TRUE_WORDS = ("on", "true", "yes", "1")
_FALSE_WORDS = ("off", "false", "no", "0")


@dataclass(frozen=True)
class Exchange:
    """One user message and the answer the model gave (partial when stopped with Ctrl-C)."""

    user: str
    assistant: str


@dataclass(frozen=True)
class PromptPlan:
    """The ids to generate from for the next message, and what had to give way for them to fit.

    `dropped` oldest exchanges are left out (and are forgotten when the answer is recorded);
    `user_text` is the message as the model sees it, `cut_chars` characters shorter than typed
    when the message alone overflowed the room the context leaves.
    """

    ids: list[int]
    dropped: int
    user_text: str
    cut_chars: int
    budget: int
    answer_room: int

    def notes(self) -> list[str]:
        """One line per compromise, for the user (empty when the whole history fits)."""
        lines = []
        if self.dropped:
            turns = "exchange" if self.dropped == 1 else "exchanges"
            lines.append(
                f"note: forgot the oldest {self.dropped} {turns} to fit the context "
                f"({self.budget} tokens for the prompt, {self.answer_room} kept for the answer)"
            )
        if self.cut_chars:
            lines.append(
                f"note: the message is too long for the context; the model sees its last "
                f"{len(self.user_text)} characters ({self.cut_chars} cut from the start)"
            )
        return lines


def answer_room(context_length: int, max_new_tokens: int) -> int:
    """Tokens of the context kept free for the answer: `max_new_tokens`, at most half the context.

    A longer answer is still generated (the window slides, as in `generate`), but reserving more
    than half would leave almost nothing of the conversation for the model to answer.
    """
    return max(0, min(max_new_tokens, context_length // 2))


class Conversation:
    """The messages so far and how they become the next prompt, trimmed to the context window."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        *,
        chat: bool,
        context_length: int,
        system: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.context_length = context_length
        self.system = system or None
        self.exchanges: list[Exchange] = []
        self.forgotten = 0  # exchanges dropped to fit the context since the last reset

    def reset(self) -> None:
        """Forget every exchange; the system prompt stays (it is a setting, not history)."""
        self.exchanges = []
        self.forgotten = 0

    def _ids(self, exchanges: Sequence[Exchange], user_text: str | None) -> list[int]:
        """Ids of the system prompt, `exchanges` and (when given) a pending user message.

        With a pending message these are the generation prompt; without one, the conversation as
        it stands (what `/stats` counts), empty when there is nothing yet.
        """
        if self.chat:
            messages: list[dict[str, str]] = []
            if self.system:
                messages.append({"role": "system", "content": self.system})
            for exchange in exchanges:
                messages.append({"role": "user", "content": exchange.user})
                messages.append({"role": "assistant", "content": exchange.assistant})
            if user_text is not None:
                messages.append({"role": "user", "content": user_text})
                return prompt_ids(messages, self.tokenizer)
            return render(messages, self.tokenizer)[0] if messages else []
        text = self.plain_text(exchanges, user_text)
        if user_text is None and not text:
            return []
        return [self.tokenizer.eos_id, *self.tokenizer.encode(text)]

    def plain_text(self, exchanges: Sequence[Exchange], user_text: str | None = None) -> str:
        """A pretrained run's view of the conversation: inputs on new lines, continuations as is."""
        text = self.system or ""
        for exchange in exchanges:
            text = _next_line(text, exchange.user) + exchange.assistant
        return text if user_text is None else _next_line(text, user_text)

    def tokens_used(self) -> int:
        """Tokens the conversation takes now (system prompt and kept exchanges)."""
        return len(self._ids(self.exchanges, None))

    def prompt_for(self, user_text: str, max_new_tokens: int) -> PromptPlan:
        """The prompt for the next message, fitting the context minus room for the answer.

        Oldest exchanges go first; with none left, the message itself is cut from the left.
        Nothing is changed until `record` (a message whose answer never comes costs nothing).
        Raises `UserError` when even the system prompt alone leaves no room.
        """
        room = answer_room(self.context_length, max_new_tokens)
        budget = self.context_length - room
        for dropped in range(len(self.exchanges) + 1):
            ids = self._ids(self.exchanges[dropped:], user_text)
            if len(ids) <= budget:
                return PromptPlan(ids, dropped, user_text, 0, budget, room)
        dropped = len(self.exchanges)

        def fits(start: int) -> bool:
            return len(self._ids([], user_text[start:])) <= budget

        if not fits(len(user_text)):
            system_tokens = len(self._ids([], ""))
            raise UserError(
                f"the system prompt takes {system_tokens} tokens, leaving no room for a message in "
                f"a context of {self.context_length} with {room} kept for the answer: shorten it "
                "(/system) or lower max_new_tokens (/set max_new_tokens N)"
            )
        low, high = 0, len(user_text)  # fits(high) holds; find the smallest start that fits
        while low < high:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        start = low
        while not fits(start):  # tokenisation is not strictly monotone in the cut: make sure
            start += 1
        kept = user_text[start:]
        return PromptPlan(self._ids([], kept), dropped, kept, start, budget, room)

    def record(self, plan: PromptPlan, answer: str) -> None:
        """Keep the exchange the plan was made for, forgetting what the plan dropped."""
        self.exchanges = [*self.exchanges[plan.dropped :], Exchange(plan.user_text, answer)]
        self.forgotten += plan.dropped


def _next_line(text: str, line: str) -> str:
    """`line` on a new line after `text` (or alone): what a typed input adds to a plain run."""
    return f"{text}\n{line}" if text else line


# ------------------------------------------------------------------------------------ /set

Settings = TypeVar("Settings", bound="DataclassInstance")  # rebuilt by dataclasses.replace


def parse_setting(name: str, raw: str) -> tuple[str, Any]:
    """`(field, value)` for `/set NAME VALUE`; a bad name or value raises `UserError`.

    `top_k 0` / `top_p 1` (or `off`) switch those filters off, `seed off` draws a fresh seed per
    answer, `greedy on|off`. Ranges are checked by `SamplingSettings` itself when applied.
    """
    key = name.strip().lower().replace("-", "_")
    value = raw.strip()
    if key not in SETTING_NAMES:
        raise UserError(f"unknown setting {name!r}; one of: {', '.join(SETTING_NAMES)}")
    if not value:
        raise UserError(f"/set {key} needs a value")
    word = value.lower()
    try:
        if key == "greedy":
            if word in _TRUE_WORDS:
                return key, True
            if word in _FALSE_WORDS:
                return key, False
            raise ValueError
        if key in ("top_k", "top_p", "seed") and word in _OFF_WORDS:
            return key, None
        if key == "top_k":
            number = int(value)
            return key, (number or None)
        if key == "seed":
            return key, int(value)
        if key == "max_new_tokens":
            number = int(value)
            if number > MAX_NEW_TOKENS_LIMIT:
                raise UserError(f"max_new_tokens must be at most {MAX_NEW_TOKENS_LIMIT:,}")
            return key, number
        real = float(value)
        if key == "top_p" and real == 1.0:
            return key, None
        return key, real
    except ValueError:
        expected = {
            "greedy": "on or off",
            "top_k": "a whole number (0 or off: no top-k)",
            "seed": "a whole number (off: a fresh seed per answer)",
            "max_new_tokens": "a whole number",
            "top_p": "a number in (0, 1] (off: no top-p)",
        }.get(key, "a number")
        raise UserError(f"/set {key}: {value!r} is not {expected}") from None


def updated_settings(settings: Settings, command: str) -> Settings:
    """`settings` with one knob changed by `/set`'s arguments (`NAME VALUE` or `NAME=VALUE`).

    The dataclass is rebuilt, so its own validation (e.g. `SamplingSettings`' ranges) runs and a
    value out of range raises `UserError` instead of reaching the sampler.
    """
    text = command.strip()
    name, _, raw = text.partition("=") if "=" in text.split(" ", 1)[0] else text.partition(" ")
    if not name:
        raise UserError(f"usage: /set NAME VALUE, NAME one of: {', '.join(SETTING_NAMES)}")
    key, value = parse_setting(name, raw)
    return dataclasses.replace(settings, **{key: value})


# ------------------------------------------------------------------------------------ input


def read_message(read_line: Callable[[str], str], prompt: str, more: str) -> str:
    """One message, possibly over several lines, from `read_line(prompt_text)`.

    A line ending in a backslash continues on the next (the backslash becomes a newline); a line
    starting with triple quotes opens a block that ends at a line ending with them, and
    the text between is one message (`\"\"\"one line\"\"\"` works too). EOFError and
    KeyboardInterrupt from the first line propagate; end of input inside a block or after a
    backslash ends the message there, so a piped script with a missing closing quote still sends
    what it has.
    """
    first = read_line(prompt)
    opening = first.lstrip()
    if opening.startswith('"""'):
        body = opening[3:]
        if body.rstrip().endswith('"""'):
            return body.rstrip()[:-3]
        parts = [body] if body else []
        while True:
            try:
                line = read_line(more)
            except EOFError:
                break
            if line.rstrip().endswith('"""'):
                closing = line.rstrip()[:-3]
                if closing:
                    parts.append(closing)
                break
            parts.append(line)
        return "\n".join(parts)
    parts = []
    line = first
    while line.endswith("\\"):
        parts.append(line[:-1])
        try:
            line = read_line(more)
        except EOFError:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)
