"""The chat page at `/` in a real headless browser: the distribution's chromium, via Playwright.

Playwright is given Debian's `/usr/bin/chromium` (`executable_path`); its own browser downloads
are never used. Without playwright or a chromium that starts, the tests skip and say why; with
`MINIGPT_REQUIRE_BROWSER=1` (set by `.ci/run` once it has installed chromium) they fail instead,
so a broken browser can never pass silently. The answer typed into the page is held to the API's
answer for the same seed and settings, over two turns; the stop button is pressed while the server
surely still generates (the gated seed of `tests/serve_server.py`). The first test writes the
screenshot the README shows (to `$MINIGPT_SERVE_SCREENSHOT` when set, else a temporary folder).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from minigpt_cli.engine.serve.app import page_html
from tests.serve_server import GATED_SEED, RecordingEngine, serving

pytestmark = pytest.mark.usefixtures("one_thread")

REQUIRED = os.environ.get("MINIGPT_REQUIRE_BROWSER") == "1"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    """`$MINIGPT_CHROMIUM`, else the distribution's chromium, if there is one."""
    candidates = [
        os.environ.get("MINIGPT_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"MINIGPT_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[test]')")
    path = chromium_path()
    if path is None:
        unavailable(
            "no chromium here: install the distribution's package (apt-get install chromium)"
        )
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(
                executable_path=path, headless=True, args=CHROMIUM_FLAGS
            )
        except Error as error:
            unavailable(f"chromium at {path} does not start: {str(error).splitlines()[0]}")
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def page_server(
    tiny_pretrain_run: Path, tiny_sft_run: Path
) -> Iterator[tuple[str, RecordingEngine]]:
    with serving(tiny_pretrain_run, tiny_sft_run, key=None) as server:
        yield server


@pytest.fixture
def page(browser: Any, page_server: tuple[str, RecordingEngine]) -> Iterator[Any]:
    url = page_server[0]
    context = browser.new_context(viewport={"width": 1100, "height": 620})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    elsewhere: list[str] = []
    opened.on("request", lambda r: None if r.url.startswith(url) else elsewhere.append(r.url))
    opened.goto(url + "/")
    opened.wait_for_selector("#model option[value=chat]", state="attached")
    yield opened
    context.close()
    assert elsewhere == []  # offline: nothing but the server is ever asked for anything


def test_the_page_asks_for_nothing_outside_the_server() -> None:
    html = page_html()
    assert "http://" not in html and "https://" not in html
    assert "<script src" not in html and "<link" not in html


def ask_in_page(page: Any, text: str) -> str:
    """Type `text`, press Enter, wait for the streamed answer to end; the answer's text."""
    before = page.locator(".message.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('.message.assistant').length > n"
        " && ['done', 'note'].includes(document.getElementById('status').dataset.state)",
        arg=before,
    )
    return page.locator(".message.assistant .content").nth(before).text_content()


def test_a_typed_question_streams_the_api_answer_over_two_turns(
    page: Any, page_server: tuple[str, RecordingEngine], tmp_path: Path
) -> None:
    url = page_server[0]
    page.select_option("#model", "chat")
    page.fill("#system", "Answer briefly.")
    page.eval_on_selector(
        "#temperature", "el => { el.value = '1'; el.dispatchEvent(new Event('input')); }"
    )
    page.fill("#max-tokens", "10")
    page.fill("#seed", "11")
    first = ask_in_page(page, "What is 2 plus 3?")
    second = ask_in_page(page, "And 4 plus 4?")
    assert "tokens/s" in page.text_content("#speed")

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    options: dict[str, Any] = {"temperature": 1.0, "max_tokens": 10, "seed": 11}
    messages: list[Any] = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 plus 3?"},
    ]
    api_first = client.chat.completions.create(model="chat", messages=messages, **options)
    assert first == api_first.choices[0].message.content
    messages += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And 4 plus 4?"},
    ]
    api_second = client.chat.completions.create(model="chat", messages=messages, **options)
    assert second == api_second.choices[0].message.content

    shot = Path(os.environ.get("MINIGPT_SERVE_SCREENSHOT") or tmp_path / "serve.png")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 0


def test_the_stop_button_interrupts_the_answer(
    page: Any, page_server: tuple[str, RecordingEngine]
) -> None:
    engine = page_server[1]
    page.select_option("#model", "base")
    page.fill("#max-tokens", "40")
    page.fill("#seed", str(GATED_SEED))
    page.fill("#input", "Once upon a time")
    page.press("#input", "Enter")
    # The first text arrives; the server then holds the generation at the gate.
    page.wait_for_function(
        "() => { const c = document.querySelector('.message.assistant .content');"
        " return c && c.textContent.length > 0; }"
    )
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_function("() => document.getElementById('status').dataset.state === 'stopped'")
    assert page.text_content(".message.assistant .stopped-mark") == "[stopped]"
    flag = engine.flags[GATED_SEED]
    assert flag is not None and flag.wait(timeout=20)  # the server saw the request go away
    engine.gate.set()
    assert engine.outcome(GATED_SEED) == "cancelled"
    # The page and the server go on: the next question is answered.
    page.fill("#seed", "")
    page.fill("#max-tokens", "4")
    assert isinstance(ask_in_page(page, "The"), str)
