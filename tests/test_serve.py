"""`minigpt serve`: the OpenAI-compatible API, driven by the official `openai` client.

One server per module, in a thread of this process, on a free localhost port, serving the shared
tiny runs (the pretrained one as "base", its SFT child as "chat"), with an API key. Answers are
held to what `generate --greedy` / `chat -p` print for the same prompt, streams to the non-streamed
text for the same seed, concurrent answers to the same request answered alone. The command's own
refusals (bad run directory, port in use, missing extra) run it as a user does.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from minigpt_cli.engine.serve.completion import Engine
from minigpt_cli.engine.serve.protocol import ApiError, CompletionRequest
from tests.conftest import run_cli
from tests.serve_server import GATED_SEED, KEY, RecordingEngine, serving

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served(
    tiny_pretrain_run: Path, tiny_sft_run: Path, one_thread: None
) -> Iterator[tuple[str, RecordingEngine]]:
    with serving(tiny_pretrain_run, tiny_sft_run) as server:
        yield server


@pytest.fixture
def client(served: tuple[str, RecordingEngine]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


# ------------------------------------------------------------------------------ the openai client


def test_models_are_listed_by_name(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["base", "chat"]
    assert client.models.retrieve("chat").id == "chat"


def test_a_streamed_chat_equals_the_non_streamed_one_for_the_same_seed(
    client: openai.OpenAI,
) -> None:
    options: dict[str, Any] = {"temperature": 1.0, "max_tokens": 12, "seed": 7}
    whole = client.chat.completions.create(
        model="chat", messages=ask("What is 2 plus 3?"), **options
    )
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.prompt_tokens > 0
    assert whole.usage.completion_tokens <= 12

    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=ask("What is 2 plus 3?"),
            stream=True,
            stream_options={"include_usage": True},
            **options,
        )
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert "".join(deltas) == text
    assert finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_completion_honours_a_stop_string(client: openai.OpenAI) -> None:
    options: dict[str, Any] = {"temperature": 0, "max_tokens": 24}
    full = client.completions.create(model="base", prompt="Once upon a time", **options)
    text = full.choices[0].text
    assert full.object == "text_completion"
    assert full.usage is not None
    assert full.usage.completion_tokens == 24 or full.choices[0].finish_reason == "stop"
    stop = next(text[i : i + 2] for i in range(3, len(text) - 1) if text[i : i + 2].strip())
    cut = client.completions.create(model="base", prompt="Once upon a time", stop=[stop], **options)
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_several_choices_in_one_request_streamed_or_not(client: openai.OpenAI) -> None:
    options: dict[str, Any] = {"max_tokens": 6, "n": 3, "seed": 3, "temperature": 1.0}
    answer = client.completions.create(model="base", prompt="The", **options)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage is not None
    assert answer.usage.completion_tokens <= 18
    streamed = ["", "", ""]
    for chunk in client.completions.create(model="base", prompt="The", stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in answer.choices]


def test_echo_puts_the_prompt_first(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="base", prompt="Once", max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model="base", prompt="Once", max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "Once" + plain.choices[0].text


def test_a_request_over_the_memory_cap_is_refused(served: tuple[str, RecordingEngine]) -> None:
    engine = served[1]
    job = engine.completion_job(CompletionRequest(model="base", prompt="a", max_tokens=2, n=4))
    capped = Engine(list(engine.models.values()), memory_cap_bytes=1)
    with pytest.raises(ApiError) as caught:
        capped.run(job)
    assert caught.value.status == 503 and "--max-memory" in caught.value.message
    one = engine.completion_job(CompletionRequest(model="base", prompt="a", max_tokens=2))
    assert engine.request_bytes(job) > 3 * engine.request_bytes(one)  # a cache row per choice


def test_what_decoding_prepares_from_the_weights_is_built_once(
    served: tuple[str, RecordingEngine], client: openai.OpenAI
) -> None:
    engine = served[1]
    client.completions.create(model="base", prompt="a", max_tokens=2)
    prepared = dict(engine.prepared)
    stacked = dict(prepared.pop("stacked"))
    assert prepared and stacked  # a decoding step per model, the stacked projections
    client.completions.create(model="base", prompt="b", max_tokens=2)
    assert all(engine.prepared[key] is value for key, value in prepared.items())
    assert all(engine.prepared["stacked"][key] is value for key, value in stacked.items())


def test_ignore_eos_draws_exactly_max_tokens(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="chat", messages=ask("hi"), max_tokens=20, extra_body={"ignore_eos": True}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 20
    assert answer.choices[0].finish_reason == "length"


def test_an_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=ask("hi"))
    assert caught.value.code == "model_not_found"


def test_a_base_run_refuses_chat_and_a_penalty_it_cannot_honour(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=ask("hi"))
    assert caught.value.code == "model_not_chat"
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="base", prompt="a", presence_penalty=0.5)


# ------------------------------------------------------------------------------ same as the CLI


def test_greedy_answers_equal_generate_and_chat(
    client: openai.OpenAI, tiny_pretrain_run: Path, tiny_sft_run: Path
) -> None:
    prompt = "Once upon a time"
    completion = client.completions.create(
        model="base", prompt=prompt, temperature=0, max_tokens=16
    )
    generated = run_cli(
        "generate", tiny_pretrain_run, "-p", prompt, "--greedy", "-n", "16", "--no-echo",
        "--device", "cpu",
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == completion.choices[0].text + "\n"

    question = "What is 4 plus 1?"
    answer = client.chat.completions.create(
        model="chat", messages=ask(question), temperature=0, max_tokens=16
    )
    chatted = run_cli(
        "chat", tiny_sft_run, "-p", question, "--greedy", "-n", "16", "--device", "cpu"
    )
    assert chatted.returncode == 0, chatted.stderr
    assert chatted.stdout == answer.choices[0].message.content + "\n"


# ------------------------------------------------------------------------------ load and faults


def test_eight_clients_of_five_requests_get_their_own_answers(
    served: tuple[str, RecordingEngine],
) -> None:
    url, engine = served

    def request(number: int) -> tuple[int, str]:
        body = {
            "model": "base",
            "prompt": f"Story {number}:",
            "max_tokens": 6,
            "temperature": 1.0,
            "seed": number,
            "stream": number % 2 == 1,
        }
        headers = {"Authorization": f"Bearer {KEY}"}
        if not body["stream"]:
            reply = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
            assert reply.status_code == 200, reply.text
            return number, reply.json()["choices"][0]["text"]
        text = ""
        with httpx.stream(
            "POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60
        ) as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            text += json.loads(line.removeprefix("data: "))["choices"][0]["text"]
        return number, text

    def client_work(client_index: int) -> list[tuple[int, str]]:
        return [request(client_index * 5 + k) for k in range(5)]

    with ThreadPoolExecutor(8) as pool:
        answers = [pair for batch in pool.map(client_work, range(8)) for pair in batch]
    assert len(answers) == 40
    for number, text in answers:
        alone = engine.run(
            engine.completion_job(
                CompletionRequest(
                    model="base",
                    prompt=f"Story {number}:",
                    max_tokens=6,
                    temperature=1.0,
                    seed=number,
                )
            )
        )
        assert text == alone[0].text, number


def test_a_client_that_disconnects_stops_its_generation(
    served: tuple[str, RecordingEngine], client: openai.OpenAI
) -> None:
    url, engine = served
    body = {
        "model": "base",
        "prompt": "Once",
        "max_tokens": 40,
        "temperature": 1.0,
        "seed": GATED_SEED,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60
    ) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # the first text: leave while the generation is paused at the gate
    # The server notices the closed connection and flags the job while it still waits at the gate.
    flag = engine.flags[GATED_SEED]
    assert flag is not None
    assert flag.wait(timeout=20)
    engine.gate.set()
    assert engine.outcome(GATED_SEED) == "cancelled"
    # The server keeps serving.
    assert client.completions.create(model="base", prompt="a", max_tokens=2).choices


def post(url: str, path: str, content: bytes | str, key: str | None = KEY) -> Any:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(url + path, content=content, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("body", "key", "status", "says"),
    [
        ('{"model": "chat", "messages": [', KEY, 400, "not valid JSON"),
        ('{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
         KEY, 422, "temperature"),
        ('{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}',
         KEY, 422, "max_tokens"),
        ('{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "colour": "red"}',
         KEY, 400, "Unrecognized request argument supplied: colour"),
        ('{"model": "chat", "messages": [{"role": "assistant", "content": "hi"}]}',
         KEY, 400, "messages"),
        ('{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}', None, 401, "No API"),
        ('{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}', "bad", 401,
         "Incorrect API key"),
    ],
    ids=["malformed", "wrong-type", "float-count", "unknown-field", "bad-roles", "no-key",
         "wrong-key"],
)  # fmt: skip
def test_bad_requests_get_openai_errors(
    served: tuple[str, RecordingEngine], body: str, key: str | None, status: int, says: str
) -> None:
    reply = post(served[0], "/v1/chat/completions", body, key)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert says in error["message"]
    assert "Traceback" not in reply.text


def test_fields_a_client_keeps_on_its_messages_are_ignored_as_openai_does(
    served: tuple[str, RecordingEngine],
) -> None:
    message = {"role": "user", "content": "hi", "id": 7, "opts": {"visible": False}}
    body = {"model": "chat", "messages": [message], "max_tokens": 2}
    reply = post(served[0], "/v1/chat/completions", json.dumps(body))
    assert reply.status_code == 200, reply.text


def test_unknown_routes_are_404_in_the_same_shape(served: tuple[str, RecordingEngine]) -> None:
    reply = httpx.get(served[0] + "/v1/nothing", timeout=10)
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "not_found"


def test_the_context_window_is_never_exceeded(
    client: openai.OpenAI, served: tuple[str, RecordingEngine]
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="Once", max_tokens=1000)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 64 tokens" in str(caught.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="word " * 200, max_tokens=4)
    # A long conversation is trimmed as `chat` trims it: oldest exchanges first, and it says so.
    history: list[dict[str, str]] = []
    for turn in range(6):
        history += [
            {"role": "user", "content": f"question number {turn} is rather long"},
            {"role": "assistant", "content": f"answer number {turn} is long as well"},
        ]
    reply = post(
        served[0],
        "/v1/chat/completions",
        json.dumps({"model": "chat", "messages": [*history, *ask("and now?")], "max_tokens": 8}),
    )
    assert reply.status_code == 200, reply.text
    assert "forgot the oldest" in reply.headers["x-minigpt-notes"]
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] + 8 <= 64


# ------------------------------------------------------------------------------ the command


def test_the_command_refuses_at_start(tmp_path: Path, tiny_pretrain_run: Path) -> None:
    missing = run_cli("serve", tmp_path / "nope")
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith("no such run directory")
    assert "Traceback" not in missing.stderr

    twice = run_cli("serve", tiny_pretrain_run, tiny_pretrain_run)
    assert twice.returncode == 2
    assert "served under the name 'run'" in twice.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = run_cli("serve", tiny_pretrain_run, "--port", str(port))
    assert busy.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: it is in use" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1

    # No fastapi: a package that fails to import shadows the installed one.
    shadow = tmp_path / "shadow" / "fastapi"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not here', name='fastapi')\n")
    import os

    path = os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])
    absent = run_cli("serve", tiny_pretrain_run, env={"PYTHONPATH": path})
    assert absent.returncode == 2
    assert "pip install 'minigpt-cli[serve]'" in absent.stderr
    assert len(absent.stderr.strip().splitlines()) == 1

    # Models that do not fit --max-memory: refused once loaded, before the server starts.
    small = run_cli("serve", tiny_pretrain_run, "--port", "0", "--max-memory", "1MB")
    assert small.returncode == 2
    assert "over --max-memory" in small.stderr
    assert len(small.stderr.strip().splitlines()) == 1


def test_the_command_serves_and_says_where(tiny_sft_run: Path) -> None:
    """The real command, under the resource caps: binds 127.0.0.1, prints the address, answers,
    serves the page, stops on SIGINT with status 0."""
    import signal
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", "serve", str(tiny_sft_run), "--port", "0",
         "--name", "mine", "--device", "cpu", "--max-memory", "4GB", "--max-cpu", "50",
         "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert "http://127.0.0.1:" in first, first + (
            process.stderr.read() if process.stderr else ""
        )
        url = first.split("OpenAI API base URL ", 1)[1].split()[0]
        assert "only this machine can connect" in process.stdout.readline()
        reply = openai.OpenAI(
            base_url=url, api_key="unused", max_retries=0
        ).chat.completions.create(model="mine", messages=ask("hi"), max_tokens=3)
        assert reply.choices[0].message.role == "assistant"
        page = httpx.get(url.removesuffix("/v1") + "/", timeout=10)
        assert page.status_code == 200 and "<!doctype html>" in page.text.lower()
    finally:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert process.stderr is not None
    assert "minigpt serve: mine: answered" in process.stderr.read()  # one log line per request
