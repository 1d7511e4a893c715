"""`minigpt export --format hf`, proved with the real library: transformers loads the folder offline
and computes what minigpt computes (logits, tokens, chat-template ids, greedy continuations); bad
input is refused in one line and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402  (after the skip: the module needs transformers)
from safetensors import safe_open  # noqa: E402

from minigpt_cli.cli.app import main  # noqa: E402
from minigpt_cli.datasets import builtin  # noqa: E402
from minigpt_cli.engine.data.chat_template import prompt_ids, render, user_prompt  # noqa: E402
from minigpt_cli.engine.data.tokenizer import Tokenizer  # noqa: E402
from minigpt_cli.engine.data.tokenizer_training import train_tokenizer  # noqa: E402
from minigpt_cli.engine.export.hf_tokenizer import tokenizer_config, tokenizer_json  # noqa: E402
from minigpt_cli.engine.export.run import export_run  # noqa: E402
from minigpt_cli.engine.inference.decode import generate_batch  # noqa: E402
from minigpt_cli.engine.inference.generation import SamplingSettings  # noqa: E402
from minigpt_cli.engine.runs.files import MODEL_FILE, STATE_FILE, save_tensors  # noqa: E402
from minigpt_cli.engine.runs.load import LoadedRun, load_run  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "Once upon a time",
    "The cat sat on the mat, and 12 + 34 = 46.",
    "从前有一只小狐狸。",
    "狐狸 means fox; 猫 means cat.",
]
TEXTS = [
    "Hello world, 你好世界! 12345 and 007.",
    "  two  spaces,\ta tab\nand a newline\n\n",
    "emoji 😀👍🏽 and é, ß, ﬁ",
    "a literal \u2581 (sentencepiece's space sign) \u2581\u2581",
    "<unk> is plain text here",
    "3+45=48 / 三加四十五等于四十八",
    "",
    " ",
]


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def pretrain_export(
    tiny_pretrain_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The pretraining run exported in this process: (run, folder)."""
    out = tmp_path_factory.mktemp("export-pretrain") / "hf"
    export_run(tiny_pretrain_run, "hf", out)
    return tiny_pretrain_run, out


@pytest.fixture(scope="module")
def lora_export(
    tiny_lora_sft_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The LoRA chat run exported by the command a user types: (run, folder)."""
    out = tmp_path_factory.mktemp("export-lora") / "hf"
    result = run_cli("export", tiny_lora_sft_run, "--format", "hf", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LoRA adapter merged" in result.stdout and "AutoModelForCausalLM" in result.stdout
    return tiny_lora_sft_run, out


def _hf_model(folder: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    return model.eval()


def _hf_tokenizer(folder: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _assert_same_ids(ours: Tokenizer, theirs: Any, text: str) -> None:
    """transformers' tokenizer gives minigpt's ids for `text` and decodes them back to it."""
    ids = ours.encode(text)
    assert theirs(text)["input_ids"] == ids, text
    assert theirs.decode(ids) == text


def _ids(encoded: object) -> list[int]:
    """The ids `apply_chat_template` returns: a list, or (transformers 5) a mapping."""
    if isinstance(encoded, list):
        return [int(i) for i in encoded]
    return [int(i) for i in encoded["input_ids"]]  # type: ignore[index]


@pytest.mark.parametrize("which", ["pretrain", "lora"])
def test_transformers_logits_equal_minigpt_on_english_and_chinese(
    which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline(monkeypatch)
    run, folder = request.getfixturevalue(f"{which}_export")
    ours = load_run(run)  # a LoRA run loads unmerged: the export's merge is checked against it
    theirs = _hf_model(folder)
    tokenizer = ours.tokenizer
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(prompt)]])
            expected = ours.model(ids)
            got = theirs(ids).logits
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, atol=1e-4, rtol=0), prompt


def test_a_lora_run_is_exported_merged(
    lora_export: tuple[Path, Path], tiny_pretrain_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline(monkeypatch)
    _run, folder = lora_export
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        assert handle.metadata() == {"format": "pt"}
    assert not any("lora" in name for name in names)
    assert "lm_head.weight" not in names  # tied, as transformers writes tied models
    # The adapter changed the model: the export is not its parent's weights.
    parent = load_run(tiny_pretrain_run)
    ids = torch.tensor([[parent.tokenizer.eos_id, *parent.tokenizer.encode(PROMPTS[0])]])
    with torch.no_grad():
        assert not torch.allclose(_hf_model(folder)(ids).logits, parent.model(ids), atol=1e-4)
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 600
    generation = json.loads((folder / "generation_config.json").read_text())
    tokenizer = parent.tokenizer
    assert generation["eos_token_id"] == [tokenizer.eos_id, tokenizer.eot_id]


def test_the_tokenizer_gives_minigpt_ids(
    pretrain_export: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline(monkeypatch)
    run, folder = pretrain_export
    ours = load_run(run).tokenizer
    theirs = _hf_tokenizer(folder)
    documents = [record["text"] for record in builtin.pretrain_records(40, seed=3)]
    for text in [*TEXTS, *documents]:
        _assert_same_ids(ours, theirs, text)
    for piece, token_id in ours.special_tokens.items():
        assert theirs.convert_tokens_to_ids(piece) == token_id
        assert theirs(piece, add_special_tokens=False)["input_ids"] == [token_id]
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
    )


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wide_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any]:
    """A 2,000-piece tokenizer (the runs' has 600: more merges, more chances to disagree) trained
    on this repository's documents and built-in text, and its exported twin loaded by
    transformers."""
    out = tmp_path_factory.mktemp("wide-tokenizer")
    texts = [path.read_text() for path in [REPO / "README.md", *sorted(REPO.glob("docs/*.md"))]]
    texts += [record["text"] for record in builtin.pretrain_records(300)]
    train_tokenizer(texts, 2000, out, num_threads=1)
    ours = Tokenizer.load(out)
    assert ours.vocab_size == 2000
    folder = out / "hf"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(ours), ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(ours, 64)))
    return ours, _hf_tokenizer(folder)


def test_a_wider_tokenizer_gives_minigpt_ids_on_source_code(
    wide_tokenizer: tuple[Tokenizer, Any],
) -> None:
    ours, theirs = wide_tokenizer
    paragraphs = [
        paragraph
        for path in sorted((REPO / "minigpt_cli" / "engine" / "export").glob("*.py"))
        for paragraph in path.read_text().split("\n\n")
        if not any(piece in paragraph for piece in ours.special_tokens)
    ]
    assert len(paragraphs) > 50
    for paragraph in paragraphs:
        _assert_same_ids(ours, theirs, paragraph)


@given(text=st.text(max_size=120))
@settings(max_examples=300, deadline=None)
def test_any_text_gets_minigpt_ids(wide_tokenizer: tuple[Tokenizer, Any], text: str) -> None:
    """Every Unicode string without a special token in it: the same ids, decoded back whole."""
    ours, theirs = wide_tokenizer
    if any(piece in text for piece in ours.special_tokens):
        return
    _assert_same_ids(ours, theirs, text)


def test_the_chat_template_gives_minigpt_ids(
    lora_export: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline(monkeypatch)
    run, folder = lora_export
    ours = load_run(run).tokenizer
    theirs = _hf_tokenizer(folder)
    conversation = [
        {"role": "system", "content": "Answer briefly. 简短回答。"},
        {"role": "user", "content": "What is 12 + 34?"},
        {"role": "assistant", "content": "46"},
        {"role": "user", "content": "猫 in English? 😀"},
    ]
    prompt = theirs.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    assert _ids(prompt) == prompt_ids(conversation, ours)
    finished = [*conversation, {"role": "assistant", "content": "cat"}]
    whole = theirs.apply_chat_template(finished, tokenize=True)
    assert _ids(whole) == render(finished, ours)[0]
    with pytest.raises(Exception, match="system message may only come first"):
        theirs.apply_chat_template([*conversation, conversation[0]], tokenize=True)


def _greedy(loaded: LoadedRun, ids: list[int], new: int) -> list[int]:
    tokenizer = loaded.tokenizer
    settings = SamplingSettings.from_config(
        loaded.config.generate,
        greedy=True,
        stop_ids=(tokenizer.eos_id, tokenizer.eot_id),
        max_new_tokens=new,
    )
    return [int(t) for t in generate_batch(loaded.model, ids, settings, 1, tokenizer=tokenizer)[0]]


def _without_stop(ids: list[int], tokenizer: Tokenizer) -> list[int]:
    """transformers keeps the stop token it ended on; minigpt's decoder does not return it."""
    return ids[:-1] if ids and ids[-1] in (tokenizer.eos_id, tokenizer.eot_id) else ids


def test_transformers_greedy_generate_equals_minigpt(
    tiny_pretrain_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On weights drawn at random (a 30-step model repeats one token, which proves little), so
    the continuation varies token by token; stopping at end of text included."""
    _offline(monkeypatch)
    run = tmp_path / "random"
    shutil.copytree(tiny_pretrain_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    loaded = load_run(run)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 1.0)
    save_tensors(run / MODEL_FILE, loaded.model.export_state_dict(), {"format": "minigpt"})
    export_run(run, "hf", tmp_path / "hf")
    theirs = _hf_model(tmp_path / "hf")
    tokenizer = loaded.tokenizer
    seen: set[int] = set()
    for prompt in PROMPTS:
        ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
        expected = _greedy(loaded, ids, 24)
        out = theirs.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)
        assert _without_stop(out[0, len(ids) :].tolist(), tokenizer) == expected, prompt
        seen.update(expected)
    assert len(seen) > 8  # real continuations, not one repeated token


def test_transformers_greedy_chat_equals_minigpt_generate_greedy(
    lora_export: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chat run through the chat template on both sides: the same reply text as the command
    `minigpt generate --greedy` prints."""
    _offline(monkeypatch)
    run, folder = lora_export
    question = "What is 3 + 4?"
    theirs, hf_tokenizer = _hf_model(folder), _hf_tokenizer(folder)
    ids = _ids(
        hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
    )
    loaded = load_run(run)
    assert ids == user_prompt(question, loaded.tokenizer)
    out = theirs.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16)
    reply = out[0, len(ids) :].tolist()
    assert _without_stop(reply, loaded.tokenizer) == _greedy(loaded, ids, 16)
    printed = run_cli(
        "generate", run, "--greedy", "--prompt", question, "-n", "16", "--no-echo", "--threads", "1"
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == hf_tokenizer.decode(reply, skip_special_tokens=True) + "\n"


# ------------------------------------------------------------------------------------ bad input


def _run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: object
) -> tuple[int, str, str]:
    """`minigpt ARGS` in this process, through the console script's own error path."""
    monkeypatch.setattr(sys, "argv", ["minigpt", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def _copy_run(source: Path, to: Path) -> Path:
    shutil.copytree(source, to, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    return to


def _unfinished(run: Path) -> None:
    state = json.loads((run / STATE_FILE).read_text())
    state["finished"] = False
    (run / STATE_FILE).write_text(json.dumps(state))


def _no_weights(run: Path) -> None:
    (run / "model.safetensors").unlink()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unfinished", "has not finished"),
        ("no_weights", "no model.safetensors"),
        ("unknown_format", "unknown format"),
        ("out_exists", "already exists"),
        ("not_a_run", "not a run directory"),
        ("out_is_the_run", "replace the run"),
    ],
)
def test_bad_input_exits_2_in_one_line_and_leaves_nothing(
    case: str,
    expected: str,
    tiny_pretrain_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = _copy_run(tiny_pretrain_run, tmp_path / "run")
    out = tmp_path / "exports" / "hf"
    fmt = "hf"
    if case == "unfinished":
        _unfinished(run)
    elif case == "no_weights":
        _no_weights(run)
    elif case == "unknown_format":
        fmt = "onnx"
    elif case == "out_exists":
        out.mkdir(parents=True)
        (out / "mine.txt").write_text("keep me")
    elif case == "not_a_run":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "out_is_the_run":
        out = run
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, stdout, stderr = _run_main(
        monkeypatch, capsys, "export", run, "--format", fmt, "--out", out
    )
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_an_export_but_never_a_run(
    pretrain_export: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, previous = pretrain_export
    out = tmp_path / "hf"
    shutil.copytree(previous, out)  # an earlier export (it holds a model.safetensors too)
    (out / "stale.txt").write_text("old export")
    code, stdout, _ = _run_main(monkeypatch, capsys, "export", run, "--out", out, "--overwrite")
    assert code == 0 and "model.safetensors" in stdout
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging or old folder left
    other = _copy_run(run, tmp_path / "other-run")
    code, _, stderr = _run_main(monkeypatch, capsys, "export", run, "--out", other, "--overwrite")
    assert code == 2 and "holds a minigpt run" in stderr
    assert (other / "model.safetensors").is_file()


def test_a_failed_write_leaves_neither_the_export_nor_its_staging_folder(
    pretrain_export: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A disk that fills after the third write (core/io.py's fault seam): exit 3, nothing left."""
    run, _ = pretrain_export
    monkeypatch.setenv("MINIGPT_FAULT", "ENOSPC@3")
    code, _, stderr = _run_main(monkeypatch, capsys, "export", run, "--out", tmp_path / "hf")
    monkeypatch.delenv("MINIGPT_FAULT")
    assert code == 3 and "no space left" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
