"""What sentencepiece's dummy prefix (an imported Llama 2 tokenizer) costs minigpt's tokenizer.

minigpt runs such a tokenizer through a copy of the model with the prefix flag cleared and puts
the prefix (a space) before each text itself (`engine/data/tokenizer.py`); decoding splits the ids
at control tokens. This measures what that adds against the peer, the very same model with the
flag cleared in the file (a tokenizer that encodes as minigpt's own do), on the built-in
pretraining documents:

- `load`: `Tokenizer(model_bytes)` (with the prefix the file's normaliser is parsed and a second
  processor loaded);
- `encode`: `encode_batch` of every document, one thread (what `eval` and the shards do);
- `decode`: `decode` of every document's ids.

One tokenizer is trained (sentencepiece BPE, byte fallback, Llama 2's settings, `--vocab`
pieces) and both variants are timed in the same process, alternately, `--repeats` rounds; the
median and range of each are printed as a Markdown table. Wall clock (`time.perf_counter`).

    python benchmarks/dummy_prefix.py                   # 8000 pieces, 7 rounds
    python benchmarks/dummy_prefix.py --vocab 32000 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _llama_like(documents: list[str], vocab: int) -> bytes:
    """A sentencepiece model trained as Llama 2's was (dummy prefix on), with minigpt's seven
    control pieces appended so minigpt's `Tokenizer` takes it."""
    import sentencepiece as spm

    from minigpt_cli.engine.data.sp_model import CONTROL, Piece, SentencePieceModel
    from minigpt_cli.engine.data.tokenizer import SPECIAL_TOKENS

    lines = [line for text in documents for line in text.split("\n") if line]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        num_threads=1,
        minloglevel=3,
    )
    model = SentencePieceModel.from_bytes(buffer.getvalue())
    model.pieces.extend(Piece(piece, 0.0, CONTROL) for piece in SPECIAL_TOKENS.values())
    return model.to_bytes()


def _seconds(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--documents", type=int, default=2000)
    args = parser.parse_args()

    from minigpt_cli.datasets import builtin
    from minigpt_cli.engine.data.sp_model import without_dummy_prefix
    from minigpt_cli.engine.data.tokenizer import Tokenizer

    documents = [record["text"] for record in builtin.pretrain_records(args.documents, seed=1)]
    megabytes = sum(len(text.encode("utf-8")) for text in documents) / 2**20
    with_prefix = _llama_like(documents, args.vocab)
    cleared = without_dummy_prefix(with_prefix)
    assert cleared is not None
    variants = {"dummy prefix": with_prefix, "none (peer)": cleared}
    tokenizers = {name: Tokenizer(data) for name, data in variants.items()}
    assert tokenizers["dummy prefix"].dummy_prefix
    assert not tokenizers["none (peer)"].dummy_prefix
    encoded = {name: tok.encode_batch(documents, 1) for name, tok in tokenizers.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, data in variants.items():  # alternately, so drift hits both alike
            tok = tokenizers[name]
            ids = encoded[name]
            for what, action in (
                ("load", lambda data=data: Tokenizer(data)),
                ("encode", lambda tok=tok: tok.encode_batch(documents, 1)),
                ("decode", lambda tok=tok, ids=ids: [tok.decode(i) for i in ids]),
            ):
                times.setdefault((name, what), []).append(_seconds(action))

    def cell(values: list[float], scale: float = 1.0) -> str:
        shown = [value * scale for value in values]
        return f"{statistics.median(shown):.1f} ({min(shown):.1f}-{max(shown):.1f})"

    print(
        f"{len(documents)} documents, {megabytes:.2f} MiB, {args.vocab} pieces, "
        f"{args.repeats} rounds; median (range)\n"
    )
    print("| tokenizer | load ms | encode ms | encode MiB/s | decode ms |")
    print("|---|---|---|---|---|")
    for name in variants:
        rate = [megabytes / t for t in times[(name, "encode")]]
        print(
            f"| {name} | {cell(times[(name, 'load')], 1e3)} | "
            f"{cell(times[(name, 'encode')], 1e3)} | {cell(rate)} | "
            f"{cell(times[(name, 'decode')], 1e3)} |"
        )


if __name__ == "__main__":
    main()
