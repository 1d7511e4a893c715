"""The chat template: the one way a conversation becomes token ids, for every stage and verb.

There is exactly one template, so SFT, DPO, RLHF, eval, generate and chat all call
`render`/`prompt_ids` here and can never disagree about what a turn looks like. The layout is

    <|begin_of_text|> ( <|role|> content <|end_of_turn|> )*  [<|assistant|>]

one role token (`<|system|>`, `<|user|>` or `<|assistant|>`) opening each message and an
end-of-turn token closing it; the optional trailing `<|assistant|>` is the generation prompt.
The markers are reserved control tokens that `Tokenizer.encode` never produces, so text a user
types (even the literal characters "<|user|>") stays ordinary text and cannot forge a turn. Each
message's content is encoded as a text of its own: with a tokenizer that has sentencepiece's dummy
prefix (an imported Llama 2 one) each content starts with it, as Hugging Face's tokenizer and
llama.cpp encode the text between two special tokens, so an export's `apply_chat_template` gives
these ids.

Loss mask (`render(...)[1]`): `mask[i]` says whether `ids[i]` is a training target, i.e. whether
the model is taught to predict it from `ids[:i]`.

- Assistant content and the assistant's `<|end_of_turn|>` are trained: learning to emit the
  end-of-turn token is what teaches the model to stop, and generation stops on it (`STOP`).
- The assistant role token is *not* trained. The template always supplies it (that is what
  `add_generation_prompt` does), so the model never has to predict it; training it would only add
  free, trivially predictable tokens that dilute the loss and inflate the token count.
- System and user turns (role token, content, end-of-turn) are not trained: the model should learn
  to answer, not to imitate the user.
- `<|begin_of_text|>` is never a target (nothing precedes it).
- `train_on_prompt=True` trains every token after `<|begin_of_text|>`, prompts and role tokens
  included (the `--train-on-prompt` behaviour).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from minigpt_cli.errors import UserError

if TYPE_CHECKING:  # the template itself needs only `ChatTokenizer`; sentencepiece stays out
    from minigpt_cli.engine.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

STOP = "eot_id"
"""Generation with this template stops on the tokenizer's end-of-turn id (`tokenizer.eot_id`):
pass `stop_token_ids(tokenizer)` as `SamplingSettings.stop_ids`. The end-of-text id is included too,
so a model that was only pretrained (and ends documents with it) also stops."""

Message = Mapping[str, Any]


class ChatTokenizer(Protocol):
    """What the template needs from a tokenizer: plain-text encoding and the reserved ids."""

    bos_id: int
    eos_id: int
    system_id: int
    user_id: int
    assistant_id: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...


def role_problem(messages: Sequence[Message], *, for_generation: bool = False) -> str | None:
    """What is wrong with the order of `messages` for this template, or None when it is fine.

    Rules: at most one system message, and only first; then user and assistant strictly
    alternate, starting with the user. A training conversation (`for_generation=False`) may end
    with either role (its last assistant turn is what is learned, checked by the data reader); a
    prompt for generation must end with the user's turn, since the assistant speaks next.
    Returned as text (not raised) so the data reader can attach `path:line` to it.
    """
    if not messages:
        return "the conversation has no messages"
    expected = "user"
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            return f"message {index}: unknown role {role!r} (expected system, user or assistant)"
        if not isinstance(message.get("content"), str):
            return f"message {index} ({role}): content must be a string"
        if role == "system":
            if index != 0:
                return f"message {index}: a system message may only come first"
            continue
        if role != expected:
            if expected == "user":
                return f"message {index}: expected a user turn, got {role} (turns must alternate)"
            return f"message {index}: expected an assistant turn, got user (turns must alternate)"
        expected = "assistant" if role == "user" else "user"
    if for_generation and messages[-1]["role"] != "user":
        return "a prompt for generation must end with the user's turn"
    return None


def _check(messages: Sequence[Message], for_generation: bool) -> None:
    problem = role_problem(messages, for_generation=for_generation)
    if problem is not None:
        raise UserError(f"chat template: {problem}")


def _role_id(tokenizer: ChatTokenizer, role: str) -> int:
    return {
        "system": tokenizer.system_id,
        "user": tokenizer.user_id,
        "assistant": tokenizer.assistant_id,
    }[role]


def render(
    messages: Sequence[Message],
    tokenizer: ChatTokenizer,
    *,
    add_generation_prompt: bool = False,
    train_on_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the chat template, and which of them are trained.

    See the module doc for the layout and the mask. With `add_generation_prompt` the ids end with
    `<|assistant|>` (never trained) so a model continues as the assistant and stops at
    `<|end_of_turn|>`; the conversation must then end with the user's turn. Role order problems
    raise `UserError`.
    """
    _check(messages, add_generation_prompt)
    ids = [tokenizer.bos_id]
    mask = [False]
    for message in messages:
        role = message["role"]
        learned = role == "assistant"
        content = tokenizer.encode(message["content"])
        ids.append(_role_id(tokenizer, role))
        mask.append(train_on_prompt)
        ids.extend(content)
        mask.extend([learned or train_on_prompt] * len(content))
        ids.append(tokenizer.eot_id)
        mask.append(learned or train_on_prompt)
    if add_generation_prompt:
        ids.append(tokenizer.assistant_id)
        mask.append(False)
    return ids, mask


def prompt_ids(messages: Sequence[Message], tokenizer: ChatTokenizer) -> list[int]:
    """What to feed a chat model to get the assistant's next reply (decode until `STOP`)."""
    return render(messages, tokenizer, add_generation_prompt=True)[0]


def render_response(
    prompt_messages: Sequence[Message], response: str, tokenizer: ChatTokenizer
) -> tuple[list[int], list[bool]]:
    """A prompt plus one assistant reply: `prompt_ids(prompt) + encode(reply) + [eot]`.

    The mask covers the reply and its end-of-turn token. DPO and reward models score chosen and
    rejected replies with exactly these ids, so preference training sees the SFT template.
    """
    return render([*prompt_messages, {"role": "assistant", "content": response}], tokenizer)


def stop_token_ids(tokenizer: ChatTokenizer) -> tuple[int, int]:
    """Ids that end a chat reply: end-of-turn (what chat-tuned models emit) and end-of-text."""
    return (tokenizer.eot_id, tokenizer.eos_id)


def mask_spans(
    ids: Sequence[int], mask: Sequence[bool], tokenizer: Tokenizer
) -> list[tuple[str, bool, bool]]:
    """`(text, trained, special)` runs of `ids`, for showing a person what is learned.

    A run is cut wherever the mask changes and around every special token (shown by name), and
    each run is decoded whole, so a character spread over several byte tokens is never split.
    """
    special = set(tokenizer.special_ids)
    spans: list[tuple[str, bool, bool]] = []
    run: list[int] = []
    run_trained = False

    def flush() -> None:
        if run:
            spans.append((tokenizer.decode(run), run_trained, False))
            run.clear()

    for token, trained in zip(ids, mask, strict=True):
        if token in special:
            flush()
            spans.append((tokenizer.decode([token], keep_special=True), bool(trained), True))
            continue
        if run and bool(trained) != run_trained:
            flush()
        run_trained = bool(trained)
        run.append(int(token))
    flush()
    return spans


def user_prompt(text: str, tokenizer: ChatTokenizer, system: str | None = None) -> list[int]:
    """`prompt_ids` of a single user message (how generate/eval wrap a plain prompt for a run that
    recorded `chat: true`)."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return prompt_ids(messages, tokenizer)
