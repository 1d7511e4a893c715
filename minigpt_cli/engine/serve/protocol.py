"""The OpenAI request schema `minigpt serve` accepts, and the error shape every refusal takes.

Written against OpenAI's API reference so that clients written for it (the official `openai`
package, Open WebUI, editors) work unchanged, and so that what minigpt cannot do is refused
clearly rather than silently ignored:

- Unknown fields are refused with 400, as OpenAI does ("Unrecognized request argument supplied"),
  at the request's top level; inside a message, as OpenAI does, they are ignored.
- A field of the wrong type or out of range is 422, the schema's status (FastAPI's convention).
- Fields that change what OpenAI would return but that minigpt cannot honour (logprobs, tools,
  logit_bias, presence/frequency penalties other than 0, best_of, suffix, a non-text
  response_format) are 400 with the field named, never ignored.
- `top_k`, `repetition_penalty` and `ignore_eos` are accepted as extensions (vLLM spells them the
  same way), so a client can reach minigpt's own sampling knobs (and time exactly `max_tokens`).

Every error body is `{"error": {"message", "type", "param", "code"}}`, OpenAI's shape. No web
framework here: `app` parses the body and calls `parse_request`.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# OpenAI allows up to 4 stop sequences and up to 128 choices; a CPU model is served one request at
# a time, so `n` is held lower: each choice is one more row of the batch in memory.
MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16


class ApiError(Exception):
    """A refusal: an HTTP status and OpenAI's error body (raised anywhere, rendered by `app`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients read the message from."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1 is not a boolean, as in OpenAI's validation.
    model_config = ConfigDict(extra="forbid", strict=True)


class _Part(BaseModel):
    # Inside a request OpenAI ignores fields it does not know (clients keep ids and UI state on
    # their messages); only the request's own top level refuses them.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Part):
    """One part of a message's content given as a list (only text parts exist for this model)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Part):
    """One message of a conversation; `name` is accepted and not shown to the model."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI concatenates them)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Part):
    include_usage: bool = False


class ResponseFormat(_Part):
    type: str


class _Sampling(_Strict):
    """Fields both endpoints share. None means "not given": the run's `[generate]` default."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None
    # Extensions (vLLM's names): minigpt's own sampling knobs.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False  # never stop at the end-of-turn/text id: exactly max_tokens (timing)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ApiError(
                400, f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop"
            )
        if any(not stop for stop in stops):
            raise ApiError(400, "stop: a stop sequence must not be empty", param="stop")
        return tuple(stops)

    def refuse_unsupported(self) -> None:
        """400 for each field whose meaning minigpt cannot honour (see the module doc)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(
                    400,
                    f"{name} is not supported by minigpt (only 0): use repetition_penalty "
                    "(above 1 discourages tokens already in the text)",
                    param=name,
                )
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by minigpt", param="logit_bias")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported by minigpt", param="logprobs")


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    def answer_budget(self) -> int | None:
        """`max_completion_tokens` (OpenAI's newer name) or `max_tokens`, whichever is given."""
        return self.max_completion_tokens or self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs:
            raise ApiError(400, "logprobs are not supported by minigpt", param="top_logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(
                400, "tools (function calling) are not supported by minigpt", param="tools"
            )
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(
                400,
                f"response_format {self.response_format.type!r} is not supported by minigpt "
                "(only 'text')",
                param="response_format",
            )


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: a plain text continuation (no chat template, even for a chat run)."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(
                400,
                f"prompt: minigpt answers one prompt per request, got a list of {len(self.prompt)}"
                " (use n for several completions of one prompt)",
                param="prompt",
            )
        return self.prompt[0]

    def answer_budget(self) -> int | None:
        return self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by minigpt", param="suffix")
        if self.best_of not in (None, 1, self.n):
            raise ApiError(400, "best_of is not supported by minigpt (use n)", param="best_of")


Request = TypeVar("Request", "ChatCompletionRequest", "CompletionRequest")


def parse_request(body: bytes, schema: type[Request]) -> Request:
    """The request in `body`, validated against `schema`, or an `ApiError` that says what is wrong.

    Malformed JSON and unknown fields: 400 (OpenAI's statuses); wrong types or values out of
    range: 422, naming the field; then the unsupported-feature checks (400).
    """
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = schema.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error) from None
    request.refuse_unsupported()
    return request


def _validation_error(error: ValidationError) -> ApiError:
    problems = error.errors(include_url=False)
    unknown = [p for p in problems if p["type"] == "extra_forbidden"]
    if unknown:
        name = ".".join(str(part) for part in unknown[0]["loc"])
        return ApiError(400, f"Unrecognized request argument supplied: {name}", param=name)
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    missing = first["type"] == "missing"
    message = f"{where}: required" if missing else f"{where}: {first['msg']}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return ApiError(422, message, param=where, code="missing" if missing else "invalid_type")
