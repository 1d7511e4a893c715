"""README.zh-CN.md stays the Chinese twin of README.md: the same code blocks, headings and tables.

Other changes land in README.md first and are carried into the Chinese file afterwards, so a test
is what keeps the two from drifting apart, and its failure message says which block, heading or
table row to carry over (index, line numbers, the first differing line).

The rule the two files follow: every fenced block is byte for byte the same (commands and their
`#` comments stay English in both); headings have the same levels in the same order; every table
has the same rows, and each cell carries the same numbers in the same order (the words around
them are translated); every relative link of the Chinese file resolves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGLISH = REPO / "README.md"
CHINESE = REPO / "README.zh-CN.md"

FENCE = re.compile(r"^(`{3,})(.*)$")
HEADING = re.compile(r"^(#{1,6}) (.+)$")
TABLE_SEPARATOR = re.compile(r"^\|(?:\s*:?-+:?\s*\|)+\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
INLINE_CODE = re.compile(r"`[^`]*`")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    heading: str  # the heading the block sits under, to find it quickly
    text: str  # the whole block, fences included


@dataclass(frozen=True)
class Table:
    line: int
    heading: str
    rows: list[list[str]]  # header and body rows (the separator left out), cells stripped


@dataclass(frozen=True)
class Heading:
    line: int
    level: int
    text: str


@dataclass(frozen=True)
class Document:
    blocks: list[Block]
    headings: list[Heading]
    tables: list[Table]
    prose: list[tuple[int, str]]  # lines outside fenced blocks, for the links


def cells(line: str) -> list[str]:
    """Split a table row on the pipes that are not escaped (`ppo\\|grpo` is one cell)."""
    inner = line.strip()[1:]
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", inner)]


def parse(path: Path) -> Document:
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    headings: list[Heading] = []
    tables: list[Table] = []
    prose: list[tuple[int, str]] = []
    heading = "(top)"
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = FENCE.match(line)
        if fence:
            start = index
            index += 1
            while index < len(lines) and lines[index].rstrip() != fence.group(1):
                index += 1
            blocks.append(Block(start + 1, heading, "\n".join(lines[start : index + 1])))
            index += 1
            continue
        match = HEADING.match(line)
        if match:
            heading = line
            headings.append(Heading(index + 1, len(match.group(1)), match.group(2)))
        if (
            line.startswith("|")
            and index + 1 < len(lines)
            and TABLE_SEPARATOR.match(lines[index + 1])
        ):
            start = index
            rows = [cells(line)]
            index += 2
            while index < len(lines) and lines[index].startswith("|"):
                rows.append(cells(lines[index]))
                index += 1
            tables.append(Table(start + 1, heading, rows))
            continue
        prose.append((index + 1, line))
        index += 1
    return Document(blocks, headings, tables, prose)


@pytest.fixture(scope="module")
def english() -> Document:
    return parse(ENGLISH)


@pytest.fixture(scope="module")
def chinese() -> Document:
    return parse(CHINESE)


def first_difference(left: str, right: str) -> tuple[int, str, str]:
    """The 1-based line of a block where two texts part, and that line in each."""
    left_lines, right_lines = left.split("\n"), right.split("\n")
    for number in range(max(len(left_lines), len(right_lines))):
        left_line = left_lines[number] if number < len(left_lines) else "(block ended)"
        right_line = right_lines[number] if number < len(right_lines) else "(block ended)"
        if left_line != right_line:
            return number + 1, left_line, right_line
    return 0, "", ""


def block_mismatch(english: Document, chinese: Document) -> str | None:
    for index, (en, zh) in enumerate(zip(english.blocks, chinese.blocks, strict=False)):
        if en.text != zh.text:
            following = index + 1
            if following < len(english.blocks) and english.blocks[following].text == zh.text:
                return (
                    f"README.md has a new fenced block {index} at line {en.line} (under "
                    f"{en.heading!r}), starting {en.text.splitlines()[1:2]}: add it to "
                    f"README.zh-CN.md before line {zh.line} (under {zh.heading!r})"
                )
            if following < len(chinese.blocks) and chinese.blocks[following].text == en.text:
                return (
                    f"README.zh-CN.md line {zh.line} (under {zh.heading!r}) holds fenced block "
                    f"{index}, which README.md no longer has: remove it"
                )
            line, en_line, zh_line = first_difference(en.text, zh.text)
            return (
                f"fenced block {index} differs: README.md line {en.line} (under {en.heading!r}) "
                f"against README.zh-CN.md line {zh.line} (under {zh.heading!r}); "
                f"first difference at line {line} of the block:\n"
                f"  README.md:       {en_line!r}\n  README.zh-CN.md: {zh_line!r}\n"
                "copy the block from README.md (blocks are never translated)"
            )
    if len(english.blocks) != len(chinese.blocks):
        longer, name = (
            (english, "README.md")
            if len(english.blocks) > len(chinese.blocks)
            else (chinese, "README.zh-CN.md")
        )
        extra = longer.blocks[min(len(english.blocks), len(chinese.blocks))]
        return (
            f"README.md has {len(english.blocks)} fenced blocks, README.zh-CN.md "
            f"{len(chinese.blocks)}: the first unmatched one is {name} line {extra.line} "
            f"(under {extra.heading!r}): {extra.text.splitlines()[0]!r}"
        )
    return None


def test_both_readmes_have_the_same_fenced_blocks(english: Document, chinese: Document) -> None:
    assert english.blocks, "README.md has no fenced blocks: the parser is broken"
    problem = block_mismatch(english, chinese)
    assert problem is None, problem


def test_both_readmes_have_the_same_heading_structure(english: Document, chinese: Document) -> None:
    for index, (en, zh) in enumerate(zip(english.headings, chinese.headings, strict=False)):
        assert en.level == zh.level, (
            f"heading {index}: README.md line {en.line} is level {en.level} ({en.text!r}), "
            f"README.zh-CN.md line {zh.line} is level {zh.level} ({zh.text!r})"
        )
    en_count, zh_count = len(english.headings), len(chinese.headings)
    assert en_count == zh_count, (
        f"README.md has {en_count} headings, README.zh-CN.md {zh_count}; the last pair "
        f"matched: {english.headings[min(en_count, zh_count) - 1].text!r}"
    )


def numbers(cell: str) -> list[str]:
    return NUMBER.findall(cell)


def test_both_readmes_have_the_same_tables_and_numbers(
    english: Document, chinese: Document
) -> None:
    for index, (en, zh) in enumerate(zip(english.tables, chinese.tables, strict=False)):
        where = f"table {index} (README.md line {en.line}, README.zh-CN.md line {zh.line})"
        assert len(en.rows) == len(zh.rows), (
            f"{where}: {len(en.rows) - 1} body rows in README.md, {len(zh.rows) - 1} in "
            "README.zh-CN.md"
        )
        for row, (en_row, zh_row) in enumerate(zip(en.rows, zh.rows, strict=True)):
            assert len(en_row) == len(zh_row), (
                f"{where}, row {row}: {len(en_row)} cells against {len(zh_row)}:\n"
                f"  README.md:       {en_row}\n  README.zh-CN.md: {zh_row}"
            )
            for column, (en_cell, zh_cell) in enumerate(zip(en_row, zh_row, strict=True)):
                assert numbers(en_cell) == numbers(zh_cell), (
                    f"{where}, row {row}, column {column}: the numbers differ:\n"
                    f"  README.md:       {en_cell!r}\n  README.zh-CN.md: {zh_cell!r}"
                )
    en_count, zh_count = len(english.tables), len(chinese.tables)
    assert en_count == zh_count, f"README.md has {en_count} tables, README.zh-CN.md {zh_count}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(document: Document) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in document.headings:
        base = slug(heading.text)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def test_the_slug_follows_github() -> None:
    """The checker itself, on the anchors README.md links to."""
    assert slug("What each stage adds: the quickstart on the built-in data") == (
        "what-each-stage-adds-the-quickstart-on-the-built-in-data"
    )
    assert slug("Int8 decoding: `--quantize int8`") == "int8-decoding---quantize-int8"
    assert slug("完整流水线：`minigpt quickstart`") == "完整流水线minigpt-quickstart"


def test_every_relative_link_of_the_chinese_readme_resolves(chinese: Document) -> None:
    own_anchors = anchors(chinese)
    broken = []
    for number, line in chinese.prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            if path:
                if not (CHINESE.parent / path).exists():
                    broken.append(f"line {number}: {target} (no such file)")
            elif anchor not in own_anchors:
                broken.append(f"line {number}: {target} (no heading has this anchor)")
    assert broken == []


def test_the_english_anchors_resolve_too(english: Document) -> None:
    """The same check on README.md shows that the slug and link reading are right."""
    own_anchors = anchors(english)
    targets = [
        target
        for _, line in english.prose
        for target in LINK.findall(INLINE_CODE.sub("", line))
        if target.startswith("#")
    ]
    assert targets and [t for t in targets if t[1:] not in own_anchors] == []


def test_the_two_readmes_and_the_handbook_link_each_other(
    english: Document, chinese: Document
) -> None:
    en_links = {t for _, line in english.prose[:5] for t in LINK.findall(line)}
    zh_links = {t for _, line in chinese.prose[:5] for t in LINK.findall(line)}
    assert "README.zh-CN.md" in en_links
    assert "README.md" in zh_links
    zh_text = CHINESE.read_text(encoding="utf-8")
    assert "](docs/handbook/zh/" in zh_text and "](docs/handbook/README.md)" in zh_text


def test_a_changed_block_is_named_with_its_first_differing_line() -> None:
    """What the lead sees when README.md's blocks moved on: the index and the line to carry."""
    english = Document([Block(10, "## A", "```bash\nminigpt a\nminigpt b\n```")], [], [], [])
    chinese = Document([Block(12, "## 甲", "```bash\nminigpt a\nminigpt c\n```")], [], [], [])
    problem = block_mismatch(english, chinese)
    assert problem is not None
    assert "fenced block 0" in problem and "line 3 of the block" in problem
    assert "'minigpt b'" in problem and "'minigpt c'" in problem


def test_a_block_added_to_the_english_readme_is_named_as_new() -> None:
    kept = Block(20, "## B", "```bash\nminigpt kept\n```")
    added = Block(15, "## A", "```bash\nminigpt new\n```")
    english = Document([added, kept], [], [], [])
    chinese = Document([Block(14, "## 乙", kept.text)], [], [], [])
    problem = block_mismatch(english, chinese)
    assert problem is not None and "new fenced block 0 at line 15" in problem
    assert "minigpt new" in problem
