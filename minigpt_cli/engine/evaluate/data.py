"""The held-out records `minigpt eval` measures on: user files, or the built-in data no run of the
chain was trained on, drawn per task family with a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from minigpt_cli.engine.data.files import read_records
from minigpt_cli.engine.data.stage_records import builtin_records
from minigpt_cli.engine.evaluate.report import EvalOptions
from minigpt_cli.engine.metrics.exact_match import select_per_family
from minigpt_cli.engine.training.text_mix import builtin_split, chain_root, pretrained_on_builtin


def builtin_heldout_documents(run_dir: Path) -> tuple[list[str], str]:
    """The built-in documents pretraining held out, and a line saying so.

    The built-in corpus has no separate validation split: pretraining validates on the last
    `data.val_fraction` of its tokens. `text_mix.builtin_split` rebuilds the corpus of the chain's
    pretraining run (its `data.builtin_size`, its tokenizer) and keeps the documents that lie
    wholly in that tail: text none of the runs was trained on (SFT's text mix rehearses only
    documents wholly before it, by the same split).
    """
    root = chain_root(run_dir)  # normally the pretraining run
    split = builtin_split(root)
    config = split.config
    held_out = [split.documents[i] for i in split.held_out]
    fraction = 100 * config.data.val_fraction
    line = (
        f"{len(held_out)} built-in documents pretraining held out (the last {fraction:g} % of "
        f"the {config.data.builtin_size}-document corpus of {root})"
    )
    if not pretrained_on_builtin(root):
        line = (
            f"{len(held_out)} built-in documents (the last {fraction:g} % of the built-in "
            f"corpus; {root} was pretrained on other text: pass --text for its own held-out text)"
        )
    return held_out, line


def _describe_files(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def load_eval_data(options: EvalOptions, first_run: Path) -> tuple[dict[str, list], dict[str, str]]:
    """Every part's records (user files or the built-in held-out data), read before any model is
    loaded so a bad line stops the command at once (`path:line: problem`)."""
    data: dict[str, list] = {}
    described: dict[str, str] = {}
    if "text" in options.parts:
        if options.text:
            data["text"] = [r["text"] for r in read_records(list(options.text), "pretrain")]
            described["text"] = (
                f"{len(data['text'])} documents from {_describe_files(options.text)}"
            )
        else:
            data["text"], described["text"] = builtin_heldout_documents(first_run)
        if options.text_documents is not None and len(data["text"]) > options.text_documents:
            described["text"] += f" (the first {options.text_documents} scored)"
            data["text"] = data["text"][: options.text_documents]
    for part, paths, kind, what in (
        ("generation", options.sft_data, "sft", "SFT records"),
        ("preference", options.pref_data, "dpo", "preference pairs"),
    ):
        if part not in options.parts:
            continue
        records = read_records(list(paths), kind) if paths else builtin_records(kind, "val")
        source = _describe_files(paths) if paths else "built-in held-out"
        data[part] = select_per_family(records, options.per_family, options.seed)
        described[part] = f"{len(data[part])} of {len(records)} {source} {what}"
    return data, described
