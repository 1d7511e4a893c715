"""The handbook (docs/handbook) stays true to the code: every code link names a file and symbol that
exist, every quoted `minigpt` command parses (verb, options, `--set` keys), the quick ones run, the
generated tables are the same in both languages, and every figure exists and has a maker."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
HANDBOOK = REPO / "docs" / "handbook"
PACKAGE = REPO / "minigpt_cli"
LANGUAGES = ("en", "zh")
CHAPTER_NAMES = sorted(path.name for path in (HANDBOOK / "en").glob("*.md"))
DOCUMENTS = sorted([HANDBOOK / "README.md", *HANDBOOK.glob("*/*.md")])

sys.path.insert(0, str(HANDBOOK))
figkit = importlib.import_module("figkit")

# [`engine/model/gpt.py: GPT.forward`](../../../minigpt_cli/engine/model/gpt.py)
CODE_LINK = re.compile(r"\[`(?P<path>[\w/]+\.py): (?P<symbol>[\w.]+)`\]\((?P<target>[^)\s]+)\)")
ANY_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
FIGURE = re.compile(r"!\[[^\]]*\]\(\.\./figures/(?P<name>[\w.-]+)\)")
BASH_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```bash\n(?P<body>.*?)```", re.S)
CI_MARK = "<!-- ci: run -->"
# A reader's runs in "try it" blocks, and the session fixtures (tests/conftest.py) that stand in
# for them when CI executes a block.
PLACEHOLDER_RUNS = {
    "runs/tiny": "tiny_pretrain_run",
    "runs/tiny-sft": "tiny_sft_run",
    "runs/tiny-lora": "tiny_lora_sft_run",
}


def chapter(language: str, name: str) -> str:
    return (HANDBOOK / language / name).read_text("utf-8")


# ---------------------------------------------------------------------------------- structure


def test_both_languages_have_the_same_chapters_and_the_index_links_them() -> None:
    assert CHAPTER_NAMES, "no chapter in docs/handbook/en"
    assert sorted(p.name for p in (HANDBOOK / "zh").glob("*.md")) == CHAPTER_NAMES
    assert all(re.fullmatch(r"\d\d-[a-z-]+\.md", name) for name in CHAPTER_NAMES)
    index = (HANDBOOK / "README.md").read_text("utf-8")
    for language in LANGUAGES:
        for name in CHAPTER_NAMES:
            assert f"]({language}/{name})" in index, f"README.md does not link {language}/{name}"
    assert "](docs/handbook/README.md)" in (REPO / "README.md").read_text("utf-8")


def outline(text: str) -> list[str]:
    """A chapter's headings as level and number only ("## 1.3"): what both languages share."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # a shell comment is no heading
    return [
        f"{m[1]} {m[2] or ''}".strip() for m in re.finditer(r"^(#+) (\d+(?:\.\d+)*)?", prose, re.M)
    ]


def test_both_languages_have_the_same_sections() -> None:
    for name in CHAPTER_NAMES:
        en, zh = (outline(chapter(language, name)) for language in LANGUAGES)
        assert en == zh, name
        assert en[0] == f"# {int(name[:2])}", f"{name}: the title is not numbered {int(name[:2])}."


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(HANDBOOK)))
def test_no_handbook_page_points_outside_the_repository(document: Path) -> None:
    assert "../shared" not in document.read_text("utf-8")


# ---------------------------------------------------------------------------------- code links


@cache
def _symbols(module: Path) -> set[str]:
    """Top-level functions, classes and assignments, and `Class.member` for their members."""
    names: set[str] = set()
    for node in ast.parse(module.read_text("utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(f"{node.name}.{member.name}")
                if isinstance(member, ast.AnnAssign) and isinstance(member.target, ast.Name):
                    names.add(f"{node.name}.{member.target.id}")
                if isinstance(member, ast.Assign):
                    names.update(
                        f"{node.name}.{t.id}" for t in member.targets if isinstance(t, ast.Name)
                    )
    return names


def code_link_problems(text: str, folder: Path) -> list[str]:
    """What is wrong with the code links of a page in `folder` (empty when nothing)."""
    problems = []
    links = list(CODE_LINK.finditer(text))
    for match in links:
        path, symbol, target = match["path"], match["symbol"], match["target"]
        resolved = (folder / target).resolve()
        if resolved != (PACKAGE / path).resolve():
            problems.append(f"{path}: link target {target} is not minigpt_cli/{path}")
            continue
        if not resolved.is_file():
            problems.append(f"{path}: no such file")
        elif symbol not in _symbols(resolved):
            problems.append(f"{path}: no symbol {symbol}")
    linked = {match.start("target") for match in links}
    for match in ANY_LINK.finditer(text):
        if "minigpt_cli/" in match["target"] and match.start("target") not in linked:
            problems.append(f"{match['target']}: a code link not written [`path.py: Symbol`](…)")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(HANDBOOK)))
def test_every_code_link_names_a_file_and_symbol_that_exist(document: Path) -> None:
    assert code_link_problems(document.read_text("utf-8"), document.parent) == []


def test_the_link_checker_catches_a_renamed_symbol_a_wrong_target_and_a_loose_link() -> None:
    folder = HANDBOOK / "en"
    target = "../../../minigpt_cli/engine/model/gpt.py"
    assert code_link_problems(f"[`engine/model/gpt.py: GPT.forward`]({target})", folder) == []
    for bad in (
        f"[`engine/model/gpt.py: GPT.forwards`]({target})",
        f"[`engine/model/gpt.py: GPT`]({target.removeprefix('../')})",
        f"[`engine/model/gpt.py: Nothing`]({target})",
        f"[the model]({target})",
    ):
        assert len(code_link_problems(bad, folder)) == 1, bad


def test_both_languages_link_the_same_code() -> None:
    for name in CHAPTER_NAMES:
        found = [
            sorted({(m["path"], m["symbol"]) for m in CODE_LINK.finditer(chapter(lang, name))})
            for lang in LANGUAGES
        ]
        assert found[0], f"{name}: no code link"
        assert found[0] == found[1], name


# ---------------------------------------------------------------------------------- commands


def _command_lines(body: str) -> list[str]:
    joined = body.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("minigpt ")]


def bash_blocks(text: str) -> Iterator[tuple[bool, list[str]]]:
    """(executed in CI, its `minigpt` command lines) for every ```bash block."""
    for match in BASH_BLOCK.finditer(text):
        yield match["before"].strip() == CI_MARK, _command_lines(match["body"])


def shell_words(line: str) -> list[str]:
    """A command line's words as the shell splits them, operators (`>`, `|`, `&&`) apart."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def is_operator(word: str) -> bool:
    return set(word) <= set("();<>|&")


def command_words(line: str) -> list[str]:
    """A command line's words up to the first shell operator or comment."""
    words = []
    for word in shell_words(line):
        if is_operator(word):
            break
        words.append(word)
    return words


@cache
def _root() -> object:
    import typer.main

    from minigpt_cli.cli.app import app

    return typer.main.get_command(app)


def command_problem(words: list[str]) -> str | None:
    """Why `minigpt WORDS` would not parse (None when it parses): an unknown verb or option, a
    bad value, a missing argument, or a `--set` key the configuration does not have."""
    from minigpt_cli.config.loader import load_config
    from minigpt_cli.errors import UserError

    assert words[0] == "minigpt"
    command, args, path = _root(), list(words[1:]), ["minigpt"]
    while hasattr(command, "commands"):
        if not args or args[0] not in command.commands:
            return f"{' '.join(path)}: no verb {args[0] if args else '(none)'}"
        path.append(args[0])
        command = command.commands[args.pop(0)]
    try:
        context = command.make_context(" ".join(path), args)  # type: ignore[attr-defined]
    except Exception as error:  # noqa: BLE001 - click's usage errors, whatever their class
        return f"{' '.join(words)}: {error}"
    for param in command.params:  # type: ignore[attr-defined]
        if "--set" in getattr(param, "opts", []) and context.params.get(param.name):
            preset = context.params.get("preset") or "tiny"
            try:
                load_config(preset=str(preset), sets=list(context.params[param.name]))
            except UserError as error:
                return f"{' '.join(words)}: {error}"
    return None


def all_commands(language: str) -> list[str]:
    return [
        line
        for name in CHAPTER_NAMES
        for _, lines in bash_blocks(chapter(language, name))
        for line in lines
    ]


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_quoted_command_parses(language: str) -> None:
    lines = all_commands(language)
    assert lines, "no minigpt command quoted"
    problems = [problem for line in lines if (problem := command_problem(command_words(line)))]
    assert problems == []


def test_the_command_check_catches_a_bad_verb_flag_value_and_key() -> None:
    assert command_problem(["minigpt", "generate", "runs/tiny", "-n", "20"]) is None
    assert command_problem(["minigpt", "config", "show", "--set", "train.max_steps=5"]) is None
    for bad in (
        "minigpt pretrian --preset tiny",
        "minigpt generate runs/tiny --tempreature 0.8",
        "minigpt generate runs/tiny -n many",
        "minigpt generate --greedy",
        "minigpt config shwo",
        "minigpt pretrain --set train.learning_rat=1e-3",
        "minigpt pretrain --set model.n_layer=-1",
    ):
        assert command_problem(command_words(bad)) is not None, bad


def test_both_languages_quote_the_same_commands() -> None:
    for name in CHAPTER_NAMES:
        blocks = [list(bash_blocks(chapter(language, name))) for language in LANGUAGES]
        assert blocks[0] == blocks[1], name


def ci_blocks() -> list[tuple[str, list[str]]]:
    return [
        (f"{name}#{index}", lines)
        for name in CHAPTER_NAMES
        for index, (executed, lines) in enumerate(bash_blocks(chapter("en", name)))
        if executed
    ]


@pytest.mark.parametrize(("block", "lines"), ci_blocks(), ids=[b for b, _ in ci_blocks()])
def test_ci_blocks_run(
    block: str, lines: list[str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Each `<!-- ci: run -->` block runs in order in a fresh folder; a reader's run (`runs/tiny`)
    is the session's fixture run of the same kind."""
    assert lines, f"{block}: an executed block without a minigpt command"
    for line in lines:
        assert not any(map(is_operator, shell_words(line))), f"{block}: shell syntax in {line}"
        words = command_words(line)
        args = []
        for word in words[1:]:
            head, _, rest = word.partition("/")
            name = f"{head}/{rest.split('/')[0]}" if rest else word
            if name in PLACEHOLDER_RUNS:
                fixture = request.getfixturevalue(PLACEHOLDER_RUNS[name])
                word = str(fixture) + word[len(name) :]
            args.append(word)
        result = run_cli(*args, cwd=tmp_path, timeout=120)
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"


PYTHON_BLOCK = re.compile(r"^```python\n(?P<body>.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[str, str]]:
    return [
        (f"{name}#{index}", match["body"])
        for name in CHAPTER_NAMES
        for index, match in enumerate(PYTHON_BLOCK.finditer(chapter("en", name)))
    ]


def test_both_languages_quote_the_same_python() -> None:
    for name in CHAPTER_NAMES:
        blocks = [PYTHON_BLOCK.findall(chapter(language, name)) for language in LANGUAGES]
        assert blocks[0] == blocks[1], name


@pytest.mark.parametrize(("block", "code"), python_blocks(), ids=[b for b, _ in python_blocks()])
def test_python_blocks_run(block: str, code: str, tmp_path: Path) -> None:
    """A chapter's Python sample runs as a reader would paste it, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{block}\n{result.stderr[-2000:]}"


# ---------------------------------------------------------------------------------- generated


def _makers() -> tuple[set[str], set[str]]:
    figures, tables = set(), set()
    for path in sorted(HANDBOOK.glob("figures_ch[0-9][0-9].py")):
        module = importlib.import_module(path.stem)
        figures |= set(module.FIGURES)
        tables |= set(module.TABLES)
    return figures, tables


def test_generated_tables_are_filled_and_identical_in_both_languages() -> None:
    _, made = _makers()
    found = set()
    for name in CHAPTER_NAMES:
        en, zh = (figkit.regions(chapter(language, name)) for language in LANGUAGES)
        assert en == zh, f"{name}: table regions differ between en and zh"
        # A region holds a table, or a command's output in a ```text block (`data inspect`).
        assert all(body.strip().startswith(("|", "```text")) for body in en.values()), name
        found |= set(en)
    assert found == made, "a table region without a maker, or a maker's table without a region"


def test_every_figure_exists_is_quoted_in_both_languages_and_has_a_maker() -> None:
    made, _ = _makers()
    quoted = set()
    for name in CHAPTER_NAMES:
        en, zh = (sorted(FIGURE.findall(chapter(language, name))) for language in LANGUAGES)
        assert en == zh, name
        quoted |= set(en)
    assert quoted == made
    assert all((HANDBOOK / "figures" / figure).is_file() for figure in quoted)
    assert all(re.fullmatch(r"ch\d\d-[a-z0-9-]+\.png", figure) for figure in quoted)


def test_replace_region_rewrites_one_region_and_refuses_a_missing_one() -> None:
    text = (
        "a\n<!-- table: x -->\nold\n<!-- /table: x -->\n"
        "b\n<!-- table: y -->\nkeep\n<!-- /table: y -->\n"
    )
    replaced = figkit.replace_region(text, "x", "| new |")
    assert figkit.regions(replaced) == {"x": "| new |", "y": "keep"}
    assert figkit.replace_region(replaced, "x", "| new |") == replaced
    with pytest.raises(KeyError):
        figkit.replace_region(text, "z", "| nothing |")
