"""From an OpenAI request to text: the prompt ids, the sampling settings, and the decoding itself.

Nothing here is new machinery: a chat request becomes ids through the one chat template, trimmed
to the context by the same `inference.chat.Conversation` that `minigpt chat` uses (oldest
exchanges forgotten first, the system prompt kept), a completion through the document start that
`minigpt generate` feeds, and both are decoded by `inference.decode.generate_batch` with settings
built from the run's `[generate]` section and the request's fields on top, so the same greedy
request answers exactly as `generate --greedy` / `chat -p` do.

Decisions a client may want to know:
- One request decodes at a time (`Engine.lock`): two decoding loops side by side only share the
  cores, every request gets the model's full speed in turn, and requests cannot corrupt each
  other; `n` choices of one request decode together as rows of one batch. Batching different
  requests would raise the total rate (README "Serving" measures by how much) but needs per-row
  sampling settings in the one decoding loop.
- An answer never outruns the context window: `prompt + max_tokens` above the context length is
  refused with OpenAI's `context_length_exceeded` (a chat's oldest exchanges are dropped first, as
  in `chat`); without `max_tokens`, the run's default is cut to the room left, and
  `finish_reason` says "length" when that room ran out.
- `finish_reason` is "stop" when the model ended its turn (end-of-turn or end-of-text id) or a
  stop string appeared, "length" when the token budget ran out. `usage.completion_tokens` counts
  the tokens the model drew (a stop id is not counted, the token that completed a stop string is).
- The weights never change while served, so what decoding prepares from them (stacked and
  transposed copies of the projections, `model.layers.frozen_weights`) is built once, at start
  (`warm_up`), and kept: it would otherwise be rebuilt for every request, most of the time to the
  first token on the small preset. It costs about one more copy of the block weights in memory.
- A client that goes away cancels its generation at the next token (`cancelled` is checked in
  the per-token callback), so the server moves on to the next request.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from minigpt_cli.engine.data.chat_template import role_problem, stop_token_ids
from minigpt_cli.engine.hardware.monitor import tree_rss_bytes
from minigpt_cli.engine.inference.chat import Conversation, Exchange
from minigpt_cli.engine.inference.decode import generate_batch
from minigpt_cli.engine.inference.generation import SamplingSettings, TextStream
from minigpt_cli.engine.model.layers import frozen_weights
from minigpt_cli.engine.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.engine.runs.load import LoadedRun


@dataclass
class ServedModel:
    """One run behind the API, under the name `/v1/models` lists."""

    name: str
    loaded: LoadedRun
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat(self) -> bool:
        """Chat-tuned (SFT, DPO, RLHF): answers `/v1/chat/completions` in the chat template."""
        return bool(self.loaded.state.get("chat"))

    @property
    def context_length(self) -> int:
        return self.loaded.model.config.context_length


@dataclass
class Job:
    """A request made ready to decode: ids, settings, choices, and what was trimmed to fit."""

    model: ServedModel
    prompt_ids: list[int]
    settings: SamplingSettings
    n: int
    notes: list[str] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Choice:
    """One finished answer: its text, why it ended, and how many tokens the model drew for it."""

    text: str
    finish_reason: str
    tokens: int


class Cancelled(Exception):
    """The client went away: raised from the per-token callback to unwind the decoding loop."""


# A callback for text as it becomes safe to show: (choice index, new text).
DeltaCallback = Callable[[int, str], None]


class Engine:
    """The models one server holds and the one lock their decoding takes turns on."""

    def __init__(self, models: Sequence[ServedModel], memory_cap_bytes: int | None = None) -> None:
        names = [model.name for model in models]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate is not None:
            raise UserError(f"two runs are served under the name {duplicate!r}: give --name")
        self.models = {model.name: model for model in models}
        self.memory_cap_bytes = memory_cap_bytes
        self.lock = threading.Lock()
        # What decoding prepares from the weights, kept for the server's life (`frozen_weights`).
        self.prepared: dict[object, Any] = {}

    def warm_up(self) -> None:
        """Decode one token with each model, so what decoding prepares from the weights is built
        (and its memory held) before the first request, not during it."""
        for model in self.models.values():
            settings = SamplingSettings(max_new_tokens=1, greedy=True)
            with self.lock, frozen_weights(self.prepared):
                tokenizer = model.loaded.tokenizer
                generate_batch(model.loaded.model, [tokenizer.eos_id], settings)

    def model(self, name: str) -> ServedModel:
        """The model a request names, or OpenAI's 404 `model_not_found`."""
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self.models)
            raise ApiError(
                404,
                f"The model {name!r} does not exist (served: {known})",
                param="model",
                code="model_not_found",
            ) from None

    # ------------------------------------------------------------------------- requests -> jobs

    def chat_job(self, request: ChatCompletionRequest) -> Job:
        """The ids and settings of a chat request, the conversation trimmed as `chat` trims it."""
        model = self.model(request.model)
        if not model.chat:
            raise ApiError(
                400,
                f"{model.name!r} is a pretrained run, not chat-tuned: it has no chat template. "
                "Use /v1/completions, or serve a run made by sft, dpo or rlhf",
                param="model",
                code="model_not_chat",
            )
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
        problem = role_problem(messages, for_generation=True)
        if problem is not None:
            raise ApiError(400, f"messages: {problem}", param="messages")
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        exchanges = [
            Exchange(user["content"], assistant["content"])
            for user, assistant in zip(turns[0:-1:2], turns[1:-1:2], strict=True)
        ]
        tokenizer = model.loaded.tokenizer
        conversation = Conversation(
            tokenizer, chat=True, context_length=model.context_length, system=system
        )
        conversation.exchanges = exchanges
        asked = request.answer_budget()
        default = model.loaded.config.generate.max_new_tokens
        try:
            plan = conversation.prompt_for(turns[-1]["content"], asked or default)
        except UserError as error:
            raise ApiError(
                400, str(error), param="messages", code="context_length_exceeded"
            ) from None
        budget = self._answer_budget(model, len(plan.ids), asked, default, "messages")
        ends = () if request.ignore_eos else stop_token_ids(tokenizer)
        settings = self._settings(model, request, budget, ends)
        return Job(model, plan.ids, settings, request.n, plan.notes())

    def completion_job(self, request: CompletionRequest) -> Job:
        """The ids and settings of a completion: the prompt as a document start (`generate`)."""
        model = self.model(request.model)
        tokenizer = model.loaded.tokenizer
        ids = [tokenizer.eos_id, *tokenizer.encode(request.prompt_text())]
        asked = request.max_tokens
        default = model.loaded.config.generate.max_new_tokens
        budget = self._answer_budget(model, len(ids), asked, default, "prompt")
        ends = tuple(i for i in (tokenizer.eos_id, tokenizer.eot_id) if i is not None and i >= 0)
        if request.ignore_eos:
            ends = ()
        settings = self._settings(model, request, budget, ends)
        return Job(model, ids, settings, request.n)

    def _answer_budget(
        self, model: ServedModel, prompt: int, asked: int | None, default: int, param: str
    ) -> int:
        """Tokens the answer may take: what was asked if it fits the context, else refused; the
        run's default cut to the room left when nothing was asked."""
        context = model.context_length
        room = context - prompt
        if asked is not None and asked > room or room < 1:
            wanted = asked if asked is not None else 1
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt + wanted} tokens ({prompt} in the {param}, {wanted} in the "
                "completion). Please reduce the length of the "
                f"{param} or completion.",
                param=param,
                code="context_length_exceeded",
            )
        return asked if asked is not None else min(default, room)

    def _settings(
        self,
        model: ServedModel,
        request: ChatCompletionRequest | CompletionRequest,
        max_new_tokens: int,
        stop_ids: tuple[int, ...],
    ) -> SamplingSettings:
        """The run's `[generate]` defaults with the request's fields over them (beam search is
        not an API feature: one beam)."""
        try:
            settings = SamplingSettings.from_config(
                model.loaded.config.generate,
                max_new_tokens=max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                repetition_penalty=request.repetition_penalty,
                seed=request.seed,
                num_beams=1,
                stop_ids=stop_ids,
                stop_strings=request.stop_strings(),
            )
        except UserError as error:
            raise ApiError(422, str(error)) from None
        if request.top_k is not None:
            settings = dataclasses.replace(settings, top_k=request.top_k or None)
        return settings

    # ------------------------------------------------------------------------------- decoding

    def request_bytes(self, job: Job) -> int:
        """Memory one job allocates while it decodes: its KV cache, token history and the
        per-step vocabulary-wide tensors (logits, probabilities, noise)."""
        model = job.model.loaded.model
        config = model.config
        kv_heads = config.n_kv_head or config.n_head
        head_dim = config.head_size or config.n_embd // config.n_head
        element = model.model.embed_tokens.weight.element_size()
        cache = 2 * config.n_layer * job.n * kv_heads * config.context_length * head_dim * element
        history = job.n * (job.prompt_tokens + job.settings.max_new_tokens) * 8
        vocabulary = 4 * job.n * model.vocab_size * 4
        return cache + history + vocabulary

    def check_memory(self, job: Job) -> None:
        """Refuse (503) a job that would take the server over `--max-memory`."""
        if self.memory_cap_bytes is None:
            return
        need = self.request_bytes(job)
        held = tree_rss_bytes()
        if held + need > self.memory_cap_bytes:
            raise ApiError(
                503,
                f"this request needs about {need / 2**20:,.1f} MB beside the "
                f"{held / 2**20:,.0f} MB the server holds, over its --max-memory cap of "
                f"{self.memory_cap_bytes / 2**20:,.0f} MB: ask for fewer choices (n)",
                param="n",
                code="memory_cap",
                kind="server_error",
            )

    def run(
        self,
        job: Job,
        on_delta: DeltaCallback | None = None,
        cancelled: threading.Event | None = None,
    ) -> list[Choice]:
        """Decode `job` when the lock is free; `on_delta(index, text)` streams each choice's text
        as it becomes final (stop strings never shown). Raises `Cancelled` when `cancelled` is set
        before or during decoding."""
        loaded = job.model.loaded
        tokenizer = loaded.tokenizer
        streams = [
            TextStream(tokenizer, job.settings.stop_strings, job.prompt_ids) for _ in range(job.n)
        ]
        drawn = [0] * job.n

        def on_token(row: int, token: int) -> None:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled
            drawn[row] += 1
            delta = streams[row].push(token)
            if delta and on_delta is not None:
                on_delta(row, delta)

        with self.lock, frozen_weights(self.prepared):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled
            self.check_memory(job)
            generate_batch(
                loaded.model,
                job.prompt_ids,
                job.settings,
                job.n,
                tokenizer=tokenizer,
                on_token=on_token,
            )
        choices = []
        for row, stream in enumerate(streams):
            tail = stream.finish()
            if tail and on_delta is not None:
                on_delta(row, tail)
            ran_out = drawn[row] >= job.settings.max_new_tokens and not stream.stopped
            choices.append(
                Choice(stream.visible_text(), "length" if ran_out else "stop", drawn[row])
            )
        return choices
