"""`minigpt chat`: history trimming, /set parsing, multi-line input, one-shot, piped and a real
terminal (pseudo-terminal through pexpect: streaming, /reset, Ctrl-C mid-answer, /exit)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from minigpt_cli.engine.data.chat_template import prompt_ids, render
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.inference.chat import (
    Conversation,
    Exchange,
    answer_room,
    read_message,
    updated_settings,
)
from minigpt_cli.engine.inference.generation import SamplingSettings
from minigpt_cli.errors import UserError
from tests.conftest import run_cli

QUESTION = "What is 2+3?"


@pytest.fixture(scope="module")
def tok(tiny_pretrain_run: Path) -> Tokenizer:
    return Tokenizer.load(tiny_pretrain_run)


def messages(system: str | None, exchanges: list[Exchange], user: str) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system else []
    for exchange in exchanges:
        out += [
            {"role": "user", "content": exchange.user},
            {"role": "assistant", "content": exchange.assistant},
        ]
    return [*out, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------ trimming


def test_oldest_exchanges_are_dropped_first_and_the_system_prompt_is_kept(tok: Tokenizer) -> None:
    conversation = Conversation(tok, chat=True, context_length=64, system="Be brief.")
    history = [
        Exchange("What is the first number?", "It is one."),
        Exchange("And the second number?", "That is two."),
        Exchange("Third?", "Three."),
    ]
    conversation.exchanges = list(history)
    plan = conversation.prompt_for("And now the fourth?", max_new_tokens=20)

    assert plan.budget == 64 - 20 and plan.answer_room == 20
    assert 1 <= plan.dropped < len(history)  # this history does not fit whole, but some of it does
    kept = history[plan.dropped :]
    assert plan.ids == prompt_ids(messages("Be brief.", kept, "And now the fourth?"), tok)
    assert len(plan.ids) <= 64 - 20
    # Minimal: keeping one more (older) exchange would not fit.
    one_more = history[plan.dropped - 1 :]
    assert len(prompt_ids(messages("Be brief.", one_more, "And now the fourth?"), tok)) > 44
    assert plan.ids[:2] == [tok.bos_id, tok.system_id]
    assert "forgot the oldest" in plan.notes()[0] and plan.cut_chars == 0

    conversation.record(plan, "Four.")
    assert conversation.exchanges == [*kept, Exchange("And now the fourth?", "Four.")]
    assert conversation.forgotten == plan.dropped
    recorded = [*kept, Exchange("And now the fourth?", "Four.")]
    assert conversation.tokens_used() == len(
        render(messages("Be brief.", recorded, "")[:-1], tok)[0]
    )
    conversation.reset()
    assert conversation.exchanges == [] and conversation.system == "Be brief."


def test_the_answer_room_is_max_new_tokens_but_at_most_half_the_context(tok: Tokenizer) -> None:
    assert answer_room(64, 20) == 20 and answer_room(64, 2000) == 32
    conversation = Conversation(tok, chat=True, context_length=64)
    conversation.exchanges = [Exchange("hello there", "hi")]
    whole = conversation.prompt_for("and you?", max_new_tokens=2000)
    assert whole.budget == 32 and whole.dropped == 0  # fits in half the context: nothing dropped


def test_a_single_over_long_message_is_cut_from_the_left_with_a_note(tok: Tokenizer) -> None:
    conversation = Conversation(tok, chat=True, context_length=64, system="Be brief.")
    conversation.exchanges = [Exchange("earlier", "yes")]
    text = " ".join(f"word{i}" for i in range(200)) + " the question at the end"
    plan = conversation.prompt_for(text, max_new_tokens=16)

    assert plan.dropped == 1 and plan.cut_chars > 0
    assert plan.user_text == text[plan.cut_chars :] and plan.user_text.endswith("at the end")
    assert plan.ids == prompt_ids(messages("Be brief.", [], plan.user_text), tok)
    assert len(plan.ids) <= 64 - 16
    longer = text[plan.cut_chars - 1 :]
    assert len(prompt_ids(messages("Be brief.", [], longer), tok)) > 48  # the cut is the smallest
    assert any("too long" in note and str(len(plan.user_text)) in note for note in plan.notes())


def test_a_system_prompt_that_leaves_no_room_is_a_user_error(tok: Tokenizer) -> None:
    conversation = Conversation(tok, chat=True, context_length=64, system="long " * 100)
    with pytest.raises(UserError, match="system prompt takes .* tokens"):
        conversation.prompt_for("hi", max_new_tokens=16)


def test_a_plain_run_sees_one_text_inputs_on_new_lines(tok: Tokenizer) -> None:
    conversation = Conversation(tok, chat=False, context_length=64, system="A story.")
    assert conversation.tokens_used() == 1 + len(tok.encode("A story."))
    plan = conversation.prompt_for("Once upon", max_new_tokens=8)
    assert plan.ids == [tok.eos_id, *tok.encode("A story.\nOnce upon")]
    conversation.record(plan, " a time")
    plan = conversation.prompt_for("The end", max_new_tokens=8)
    assert plan.ids == [tok.eos_id, *tok.encode("A story.\nOnce upon a time\nThe end")]
    conversation.system = None
    conversation.reset()
    assert conversation.tokens_used() == 0
    assert conversation.prompt_for("x", 8).ids == [tok.eos_id, *tok.encode("x")]  # as generate


# ------------------------------------------------------------------------------ /set


@pytest.mark.parametrize(
    ("command", "field", "value"),
    [
        ("temperature 0.7", "temperature", 0.7),
        ("temperature=0", "temperature", 0.0),
        ("top_k 5", "top_k", 5),
        ("top-k 0", "top_k", None),
        ("top_p off", "top_p", None),
        ("top_p 0.5", "top_p", 0.5),
        ("repetition_penalty 1.3", "repetition_penalty", 1.3),
        ("max_new_tokens 2000", "max_new_tokens", 2000),
        ("seed 7", "seed", 7),
        ("seed off", "seed", None),
        ("greedy on", "greedy", True),
        ("GREEDY no", "greedy", False),
    ],
)
def test_set_changes_one_knob(command: str, field: str, value: object) -> None:
    before = SamplingSettings(seed=3, greedy=True)
    after = updated_settings(before, command)
    assert getattr(after, field) == value
    unchanged = {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "greedy"} - {field}
    assert all(getattr(after, name) == getattr(before, name) for name in unchanged)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("temperature abc", "'abc' is not a number"),
        ("temperature -1", "temperature must be 0 or more"),
        ("top_p 1.5", "top_p must be in"),
        ("top_k 2.5", "not a whole number"),
        ("max_new_tokens 0", "max_new_tokens must be at least 1"),
        ("max_new_tokens 99999999999", "at most 1,000,000"),
        ("greedy maybe", "not on or off"),
        ("temperature", "needs a value"),
        ("beams 4", "unknown setting 'beams'"),
        ("", "usage: /set NAME VALUE"),
    ],
)
def test_set_with_a_bad_value_is_a_message(command: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        updated_settings(SamplingSettings(), command)


# ------------------------------------------------------------------------------ input


def lines_from(*lines: str):
    queue = list(lines)

    def read(_prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read


def test_multi_line_input_backslash_and_triple_quotes() -> None:
    assert read_message(lines_from("one \\", "two\\", "three", "next"), "> ", "") == (
        "one \ntwo\nthree"
    )
    assert read_message(lines_from('"""', "a", "", "b", '"""', "next"), "> ", "") == "a\n\nb"
    assert read_message(lines_from('"""first', 'last"""'), "> ", "") == "first\nlast"
    assert read_message(lines_from('"""just this"""'), "> ", "") == "just this"
    assert read_message(lines_from('"""', "unclosed"), "> ", "") == "unclosed"  # EOF ends it
    with pytest.raises(EOFError):
        read_message(lines_from(), "> ", "")


# ------------------------------------------------------------------------------ the verb


def chat(*args: str | Path, input_text: str | None = None):
    from minigpt_cli.cli.app import app

    return CliRunner().invoke(app, ["chat", *map(str, args)], input=input_text)


def generate(*args: str | Path):
    from minigpt_cli.cli.app import app

    return CliRunner().invoke(app, ["generate", *map(str, args)])


def test_one_shot_answers_exactly_as_generate_does(
    tiny_sft_run: Path, tiny_pretrain_run: Path
) -> None:
    for run in (tiny_sft_run, tiny_pretrain_run):  # chat template, then plain text
        said = []
        for seed in ("1", "2", "3"):
            sampling = ["--seed", seed, "--temperature", "0.9", "--top-k", "40", "-n", "24"]
            answer = chat(run, "-p", QUESTION, *sampling, "--device", "cpu")
            reference = generate(run, "-p", QUESTION, *sampling, "--no-echo", "--device", "cpu")
            assert answer.exit_code == 0, answer.output
            assert reference.exit_code == 0, reference.output
            assert answer.stdout == reference.stdout and answer.stdout.endswith("\n")
            said.append(answer.stdout.strip())
        # Something was said (a barely trained model may stop at once for one seed): the
        # comparison is not only of blanks.
        assert any(said)


def test_piped_stdin_is_a_scriptable_multi_turn_chat(tiny_sft_run: Path, tok: Tokenizer) -> None:
    one_shot = chat(tiny_sft_run, "-p", QUESTION, "--greedy", "-n", "6").stdout
    script = "\n".join(
        [QUESTION, "", QUESTION, "/stats", "/set temperature abc", "/bogus", "/reset", "/stats"]
        + [QUESTION, "/exit", "never answered"]
    )
    result = chat(tiny_sft_run, "--greedy", "-n", "6", input_text=script + "\n")
    assert result.exit_code == 0, result.output
    first = one_shot.rstrip("\n")
    lines = result.stdout.splitlines()
    assert lines[0] == first  # the blank line is skipped, not sent
    second = lines[1]
    stats = "\n".join(lines[2:5])
    history = [Exchange(QUESTION, first), Exchange(QUESTION, second)]
    used = len(render(messages(None, history, "")[:-1], tok)[0])
    assert f"context: {used} / 64 tokens used" in stats and "turns kept: 2" in stats
    assert re.search(r"last answer: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)", stats)
    after_reset = "\n".join(lines[5:8])
    assert "context: 0 / 64 tokens used" in after_reset and "turns kept: 0" in after_reset
    assert lines[8:] == [first]  # after /reset the same question gets the one-shot answer
    assert "you>" not in result.stdout
    # Notes and complaints go to stderr, one line each, and the chat goes on.
    assert "/set temperature: 'abc' is not a number" in result.stderr
    assert "unknown command /bogus" in result.stderr
    assert "conversation cleared" in result.stderr


def test_a_missing_run_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("chat", tmp_path / "nope")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: no such run directory"
    ]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_real_terminal_session(tiny_sft_run: Path, tiny_pretrain_run: Path) -> None:
    one_shot = chat(tiny_sft_run, "-p", QUESTION, "--greedy", "-n", "6").stdout.rstrip("\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    # Ctrl-C reaches the chat as at a terminal, even when pytest runs as a background job (SIGINT
    # ignored, which a child inherits).
    spawn = {"env": env, "encoding": "utf-8", "timeout": 120, "preexec_fn": _default_sigint}
    args = ["-m", "minigpt_cli", "chat", str(tiny_sft_run), "--greedy", "-n", "6"]
    child = pexpect.spawn(sys.executable, args, **spawn)
    try:
        child.expect("/help for commands")  # the banner
        assert "chat-tuned" in child.before and "context 64 tokens" in child.before
        child.expect_exact("you> ")

        child.sendline(QUESTION)
        child.expect_exact("you> ")
        answer = child.before.replace("\r\n", "\n").split(QUESTION + "\n", 1)[1].rstrip("\n")
        assert answer == one_shot  # streamed through the terminal, same as the plain path
        child.sendline("/stats")
        child.expect(r"turns kept: (\d+)")
        assert child.match.group(1) == "1"
        child.expect_exact("you> ")

        child.sendline("/reset")
        child.expect_exact("you> ")
        child.sendline("/stats")
        child.expect(r"context: (\d+) / 64 tokens used")
        assert child.match.group(1) == "0"
        child.expect(r"turns kept: (\d+)")
        assert child.match.group(1) == "0"
        child.expect_exact("you> ")

        # Ctrl-C at the prompt clears the line and asks again. Sent once readline has echoed the
        # text and gone back to waiting: CPython's readline misses a SIGINT that lands while it is
        # still handling a keystroke (until the next key), which only a script is fast enough for.
        child.send("half a line")
        child.expect_exact("half a line")
        time.sleep(0.5)
        child.sendintr()
        child.expect_exact("you> ")

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0

    # Ctrl-C mid-answer stops the answer, not the chat. A barely pretrained run continues text for
    # long (its end-of-text id is one token in hundreds), so the interrupt lands mid-answer; a
    # chat-tuned one may end its answer before the signal arrives.
    args = ["-m", "minigpt_cli", "chat", str(tiny_pretrain_run), "--seed", "1", "-n", "2000"]
    child = pexpect.spawn(sys.executable, args, **spawn)
    try:
        child.expect_exact("you> ")
        child.sendline("Once upon a time")
        child.expect_exact("Once upon a time\r\n")
        child.expect(r"\S\S\S")  # the answer has started streaming
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact("you> ")
        child.sendline("/stats")
        child.expect(r"last answer: (\d+) tokens .*stopped with Ctrl-C")
        assert 0 < int(child.match.group(1)) < 2000
        child.expect_exact("turns kept: 1")  # the partial answer is kept
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
