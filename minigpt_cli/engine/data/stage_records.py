"""Which records a stage trains and validates on: the built-in data or the user's files, split.

Every fine-tuning stage asks here for its train and val records, so the built-in data and `--data`
files reach it in the same canonical shape (`records.normalise_record`), and the share of the
user's files held out for validation is the same whatever the training seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from minigpt_cli.datasets import builtin
from minigpt_cli.engine.data.files import read_records
from minigpt_cli.engine.data.records import check_kind, normalise_record
from minigpt_cli.errors import UserError


def builtin_records(
    kind: str, split: str = "train", size: int | None = None, seed: int = 0
) -> list[dict]:
    """The built-in data for `kind`, normalised exactly as a `--data` file would be.

    `size` is the training size (`[data] builtin_size`); a val split gets its share of it (see
    `datasets.builtin.default_size`). Pretraining records stay `{"text", "task"}`.
    """
    check_kind(kind)
    generator_kind = "dpo" if kind == "reward" else kind
    try:
        count = builtin.default_size(generator_kind, split, size)
        raw = builtin.records(generator_kind, split, count, seed)
    except ValueError as error:
        raise UserError(str(error)) from None
    return [normalise_record(record, kind) for record in raw]


def builtin_documents(size: int | None = None, seed: int = 0) -> list[str]:
    """The built-in pretraining corpus as a list of documents (a few MB at the default size)."""
    return [record["text"] for record in builtin_records("pretrain", "train", size, seed)]


def validation_split(tokens: int, val_fraction: float) -> int:
    """Where a pretraining stream without --val-data splits: the first `split` of `tokens`
    train, the last `val_fraction` validates. Pretraining, evaluation's held-out text and SFT's
    text mix all cut here, so none of them can disagree about which text was trained."""
    return int(tokens * (1 - val_fraction))


def document_split(lengths: Sequence[int], val_fraction: float) -> tuple[list[int], list[int]]:
    """(trained, held_out) indices of documents laid end to end as pretraining lays them (each
    document's ids, then one end-of-text id; `lengths` counts the ids without it).

    Trained: documents lying wholly before the validation tail, end-of-text included; held out:
    documents starting in it. The one document straddling the split is in neither, so a document
    evaluation scores can never be one a later stage rehearses.
    """
    total = sum(length + 1 for length in lengths)
    split = validation_split(total, val_fraction)
    trained, held_out, start = [], [], 0
    for index, length in enumerate(lengths):
        end = start + length + 1
        if end <= split:
            trained.append(index)
        elif start >= split:
            held_out.append(index)
        start = end
    return trained, held_out


_KIND_NOUN = {"sft": "SFT record", "dpo": "preference pair", "rlhf": "prompt"}
VAL_SPLIT_SEED = 0  # the held-out share of --data files: the same whatever the training seed


def split_records(
    records: Sequence[dict], val_fraction: float, kind: str = "sft"
) -> tuple[list[dict], list[dict]]:
    """(train, val): a fixed-seed random `val_fraction` (at least one record) held out, order
    kept. Random rather than the tail, because a file sorted by topic would hold out one topic."""
    import numpy as np

    if len(records) < 2:
        raise UserError(
            f"only {len(records)} {_KIND_NOUN.get(kind, 'record')}: need at least 2 to hold one "
            "out for validation (add data or pass --val-data)"
        )
    held = max(1, round(len(records) * val_fraction))
    chosen = set(np.random.default_rng(VAL_SPLIT_SEED).permutation(len(records))[:held].tolist())
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


def stage_records(
    kind: str, paths: Sequence[Path] | None, split: str, builtin_size: int, val_fraction: float
) -> list[dict]:
    """Normalised records of `kind` for `split` ("train", "val" or "all").

    No paths: the built-in data (`builtin_size` training records, seed 0; its val split is held
    out by construction). With paths: "train"/"val" split the files' records by `split_records`,
    and "all" returns everything (what `--val-data` files are).
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not paths:
        return builtin_records(kind, "train" if split == "all" else split, builtin_size, 0)
    records = read_records(list(paths), kind)
    if split == "all":
        return records
    train, val = split_records(records, val_fraction, kind)
    return train if split == "train" else val
