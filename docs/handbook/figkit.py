"""What every chapter's figure module shares: running `minigpt`, reusing runs, writing figures and
filling the generated tables of both languages.

A chapter module (`figures_chNN.py`) declares the names it produces (`FIGURES`, `TABLES`) and a
`make(kit)` that `make_figures.py` calls; everything it runs goes through `Kit.minigpt`, so the
commands a figure came from are printed and logged (`WORKDIR/commands.txt`), and every table goes
through `Kit.table`, which rewrites the region `<!-- table: NAME -->` ... `<!-- /table: NAME -->`
in the English and the Chinese chapter alike: the numbers cannot differ between the languages.

This module imports only the standard library, so `tests/test_handbook.py` can use the region
functions without torch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HANDBOOK = Path(__file__).resolve().parent
REPO = HANDBOOK.parents[1]
FIGURES = HANDBOOK / "figures"
LANGUAGES = ("en", "zh")

_REGION = re.compile(
    r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(\n?<!-- /table: (?P=name) -->)", re.S
)


def regions(text: str) -> dict[str, str]:
    """Every generated table region of a chapter: name -> body (the text between the markers)."""
    return {match["name"]: match["body"].rstrip("\n") for match in _REGION.finditer(text)}


def replace_region(text: str, name: str, body: str) -> str:
    """`text` with region `name`'s body replaced by `body`; KeyError when it has no such region."""
    found = False

    def swap(match: re.Match[str]) -> str:
        nonlocal found
        if match["name"] != name:
            return match[0]
        found = True
        return f"{match[1]}{body.rstrip()}\n<!-- /table: {name} -->"

    result = _REGION.sub(swap, text)
    if not found:
        raise KeyError(name)
    return result


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are written as given (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plain_log_axis(axis: Any) -> None:
    """Tick labels of a log-scaled y axis as plain numbers (2, 3, 4) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.yaxis.set_major_formatter(plain)
    axis.yaxis.set_minor_formatter(plain)


def chapters() -> list[Path]:
    """Every chapter file of both languages."""
    return sorted(path for language in LANGUAGES for path in (HANDBOOK / language).glob("*.md"))


class Kit:
    """One make_figures session: its work folder, the commands it ran, the files it wrote."""

    def __init__(self, workdir: Path, figures: Path = FIGURES) -> None:
        self.workdir = workdir.resolve()
        self.figures = figures
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.figures.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "commands.txt"

    # ------------------------------------------------------------------------------ commands

    def minigpt(self, *args: str | Path, cwd: Path | None = None) -> str:
        """Run `minigpt ARGS` (this checkout's package) and return its stdout; failure stops."""
        words = [str(arg) for arg in args]
        shown = "minigpt " + shlex.join(words)
        print(f"$ {shown}", flush=True)
        with self.log.open("a", encoding="utf-8") as log:
            log.write(shown + "\n")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        began = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "minigpt_cli", *words],
            cwd=cwd or self.workdir,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise SystemExit(f"{shown} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        print(f"  done in {time.monotonic() - began:.0f}s", flush=True)
        return result.stdout

    def quickstart(self) -> Path:
        """The tiny quickstart every chapter reads (seed 0), trained only when not already here."""
        out = self.workdir / "quickstart"
        if not (out / "eval.json").is_file():
            self.minigpt("quickstart", "--preset", "tiny", "--seed", "0", "--out", out)
        return out

    def training_run(self, name: str, verb: str, *args: str | Path) -> Path:
        """`minigpt VERB ARGS --out WORKDIR/NAME`, reused when that run already finished."""
        out = self.workdir / name
        state = out / "trainer_state.json"
        if not (state.is_file() and json.loads(state.read_text()).get("finished")):
            self.minigpt(verb, *args, "--out", out, "--overwrite")
        return out

    # ------------------------------------------------------------------------------ outputs

    def save_figure(self, figure: Any, name: str) -> Path:
        """Write a matplotlib figure as `figures/NAME` (a PNG without a creation date, so an
        unchanged figure is an unchanged file)."""
        path = self.figures / name
        figure.savefig(path, format="png", dpi=110, metadata={"Software": None})
        print(f"  wrote {path.relative_to(REPO)}", flush=True)
        return path

    def table(self, name: str, body: str) -> None:
        """Put `body` into region `name` of every chapter holding it, in both languages."""
        holders = [path for path in chapters() if name in regions(path.read_text("utf-8"))]
        languages = {path.parent.name for path in holders}
        if languages != set(LANGUAGES):
            raise SystemExit(f"table {name!r}: region missing in {set(LANGUAGES) - languages}")
        for path in holders:
            text = path.read_text("utf-8")
            path.write_text(replace_region(text, name, body), "utf-8")
        print(f"  table {name}: {', '.join(str(p.relative_to(HANDBOOK)) for p in holders)}")
