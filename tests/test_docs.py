"""The repository explains itself: the code map lists every module, and what the documents name
(`engine/x.py`, `engine/x.py:function`) exists, so a move or a rename cannot leave them behind."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "minigpt_cli"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
DOCUMENTS = [REPO / "README.md", REPO / "README.zh-CN.md", *sorted((REPO / "docs").glob("*.md"))]
# `engine/runs/load.py`, optionally `:load_run` or `:Trainer.fit`, as the documents write them.
MODULE_REFERENCE = re.compile(
    r"`(?:minigpt_cli/)?((?:cli|config|datasets|engine)/[\w/]+\.py)(?::([\w.]+))?"
)


def package_modules() -> list[str]:
    return sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    )


def references(document: Path) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in MODULE_REFERENCE.finditer(document.read_text())]


def test_the_code_map_lists_every_module() -> None:
    text = ARCHITECTURE.read_text()
    missing = [module for module in package_modules() if f"`{module}`" not in text]
    assert missing == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_module_and_name_a_document_mentions_exists(document: Path) -> None:
    stale = []
    for module, name in references(document):
        if not (PACKAGE / module).is_file():
            stale.append(module)
            continue
        if name is None:
            continue
        target: object = importlib.import_module(
            "minigpt_cli." + module.removesuffix(".py").replace("/", ".")
        )
        for part in name.split("."):
            if not hasattr(target, part):
                stale.append(f"{module}:{name}")
                break
            target = getattr(target, part)
    assert stale == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_no_document_points_outside_the_repository(document: Path) -> None:
    assert "../shared" not in document.read_text()


def test_the_verb_table_names_every_verb() -> None:
    from minigpt_cli.cli.app import app

    verbs = {command.name for command in app.registered_commands}
    verbs |= {group.name for group in app.registered_groups}
    table = ARCHITECTURE.read_text().split("## One hop from each verb", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z]+)`", table, flags=re.M))
    assert verbs and listed == verbs


def test_the_reference_pattern_reads_paths_and_names() -> None:
    """The checker itself: both forms of reference are read."""
    sample = "see `engine/runs/load.py:load_run` and `minigpt_cli/cli/app.py`."
    assert MODULE_REFERENCE.findall(sample) == [
        ("engine/runs/load.py", "load_run"),
        ("cli/app.py", ""),
    ]
