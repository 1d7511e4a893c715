"""Every figure and generated table of the handbook, made from real `minigpt` runs.

    python docs/handbook/make_figures.py [--workdir DIR] [--chapter N ...]

One tiny quickstart (`minigpt quickstart --preset tiny --seed 0`, minutes on two cores) is
trained in DIR/quickstart unless one is already there, plus the short runs a chapter asks for;
then each chapter module `figures_chNN.py` draws its PNGs into `figures/` and rewrites its table
regions in `en/` and `zh/`. A chapter is added by adding its module: this driver finds them.
The commands run are printed and kept in DIR/commands.txt.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the chapter modules and figkit sit beside this script

from figkit import REPO, Kit  # noqa: E402


def chapter_modules() -> dict[int, str]:
    """Chapter number -> module name, for every `figures_chNN.py` beside this script."""
    return {int(path.stem[-2:]): path.stem for path in sorted(HERE.glob("figures_ch[0-9][0-9].py"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "runs" / "handbook",
        help="where the runs are trained and reused (default runs/handbook)",
    )
    parser.add_argument("--chapter", type=int, action="append", help="only these chapters")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # this checkout's minigpt_cli, whatever is installed
    kit = Kit(args.workdir)
    modules = chapter_modules()
    for number in sorted(args.chapter or modules):
        if number not in modules:
            raise SystemExit(f"no figures_ch{number:02d}.py in {HERE}")
        began = time.monotonic()
        print(f"== chapter {number}", flush=True)
        importlib.import_module(modules[number]).make(kit)
        print(f"== chapter {number} done in {time.monotonic() - began:.0f}s", flush=True)


if __name__ == "__main__":
    main()
