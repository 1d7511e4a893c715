"""`minigpt import HF_DIR --out RUN`, proved with the real library: random `LlamaForCausalLM`s built
by transformers (nothing downloaded) are imported and compute the same logits; an imported run
fine-tunes with `sft` and exports back to a folder transformers loads with the fine-tuned logits;
what minigpt cannot represent is refused in one line naming the key, leaving nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from minigpt_cli.config.loader import read_run_config  # noqa: E402
from minigpt_cli.config.schema import ModelConfig  # noqa: E402
from minigpt_cli.datasets import builtin  # noqa: E402
from minigpt_cli.engine.data import shards  # noqa: E402
from minigpt_cli.engine.data.chat_template import prompt_ids, user_prompt  # noqa: E402
from minigpt_cli.engine.data.shards import (  # noqa: E402
    TokenShards,
    encode_texts_to_array,
    encode_to_shards,
)
from minigpt_cli.engine.data.sp_model import (  # noqa: E402
    BYTE,
    NORMAL,
    SentencePieceModel,
    has_dummy_prefix,
    without_dummy_prefix,
)
from minigpt_cli.engine.data.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402
from minigpt_cli.engine.data.tokenizer_training import train_tokenizer  # noqa: E402
from minigpt_cli.engine.export import hf_import, hf_tokenizer, hf_tokenizer_import  # noqa: E402
from minigpt_cli.engine.export.hf_checkpoint import expected_shapes  # noqa: E402
from minigpt_cli.engine.export.hf_import import import_hf  # noqa: E402
from minigpt_cli.engine.export.run import export_run  # noqa: E402
from minigpt_cli.engine.inference.generation import TextStream  # noqa: E402
from minigpt_cli.engine.metrics.text import score_text  # noqa: E402
from minigpt_cli.engine.model.gpt import GPT  # noqa: E402
from minigpt_cli.engine.runs.checkpoint import read_state  # noqa: E402
from minigpt_cli.engine.runs.files import canonical_safetensors, save_tensors  # noqa: E402
from minigpt_cli.engine.runs.load import load_run  # noqa: E402
from tests import llama_cpp_build  # noqa: E402
from tests.conftest import FINETUNE_SETS, RLHF_SETS, run_cli, set_args  # noqa: E402
from tests.test_export import PROMPTS, _greedy, _ids, _run_main, _without_stop  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
transformers.utils.logging.disable_progress_bar()  # its bars would land in captured stderr

TEXTS = [
    "Hello world, 你好世界! 12345 and 007.",
    "  two  spaces,\ta tab\nand a newline\n\n",
    "emoji 😀👍🏽 and é, ß, ﬁ",
    "a literal \u2581 (sentencepiece's space sign)",
    "<|user|> is plain text here",
]
SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 96,  # not the 8/3 rule's 192: taken from the config
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rope_theta": 500_000.0,
    "rms_norm_eps": 1e-5,
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600-piece minigpt tokenizer as `minigpt export` writes it: tokenizer.model (the
    sentencepiece model) beside the tokenizer.json derived from it."""
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [record["text"] for record in builtin.pretrain_records(300)]
    train_tokenizer(texts, 600, out / "trained", num_threads=1)
    tokenizer = Tokenizer.load(out / "trained")
    folder = out / "files"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(tokenizer.model_bytes)
    hf_json = hf_tokenizer.tokenizer_json(tokenizer)
    (folder / "tokenizer.json").write_text(json.dumps(hf_json, ensure_ascii=False))
    return folder


def _randomise(model: Any, seed: int) -> None:
    """Weights far from transformers' N(0, 0.02) start, so that any mix-up moves the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(noise * 0.3 if parameter.dim() == 2 else 1.0 + 0.1 * noise)


def make_checkpoint(
    folder: Path,
    tokenizer: Path | None,
    *,
    vocab_size: int = 600,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **config: Any,
) -> Path:
    """A random `LlamaForCausalLM` saved by transformers, with the tokenizer files of `tokenizer`
    (a folder) beside it."""
    settings = {**SHAPE, "bos_token_id": 1, "eos_token_id": 2, **config}
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=vocab_size, **settings)
    )
    _randomise(model, seed)
    if config.get("tie_word_embeddings"):
        model.tie_weights()
    model = model.to(dtype)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **extra)
    for file in sorted(tokenizer.iterdir()) if tokenizer else []:
        shutil.copy(file, folder / file.name)
    return folder


def _hf_model(folder: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32
    )
    return model.eval()


def assert_same_logits(hf_dir: Path, run: Path, vocab: int | None = None) -> None:
    """minigpt's logits of `run` equal transformers' of `hf_dir` within 1e-4 on English and
    Chinese prompts (the first `vocab` columns: the checkpoint's own ids)."""
    ours = load_run(run)
    theirs = _hf_model(hf_dir)
    tokenizer = ours.tokenizer
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(prompt)]])
            expected = theirs(ids).logits[..., :vocab]
            got = ours.model(ids)[..., : expected.shape[-1]]
            assert got.shape == expected.shape
            assert expected.abs().max() > 1.0  # real logits, not a near-uniform start
            assert torch.allclose(got, expected, atol=1e-4, rtol=0), prompt


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_an_imported_checkpoint_computes_transformers_logits(
    tied: bool, tokenizer_files: Path, tmp_path: Path
) -> None:
    hf_dir = make_checkpoint(tmp_path / "hf", tokenizer_files, tie_word_embeddings=tied)
    report = import_hf(hf_dir, tmp_path / "run")
    assert report.renamed == {} and report.added == {} and report.vocab_size == 600
    assert_same_logits(hf_dir, tmp_path / "run")
    model = read_run_config(tmp_path / "run").model
    assert (model.n_head, model.kv_heads, model.head_dim, model.ffn_dim) == (4, 2, 16, 96)
    assert (model.rope_theta, model.norm_eps, model.tie_embeddings) == (500_000.0, 1e-5, tied)
    state = read_state(tmp_path / "run")
    assert state["finished"] is True and state["stage"] == "import"
    sources = state["sources"]
    assert sources["imported_from"] == str(hf_dir.resolve())
    digest = hashlib.sha256((hf_dir / "config.json").read_bytes()).hexdigest()
    assert sources["config_sha256"] == digest and sources["tokenizer"] == "tokenizer.model"
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert canonical_safetensors(weights) == weights  # as every run's weights are written
    # The tokenizer is kept piece for piece: the same bytes as the checkpoint's.
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == (
        tokenizer_files / "tokenizer.model"
    ).read_bytes()


def test_a_sharded_bf16_checkpoint_with_its_own_head_width(
    tokenizer_files: Path, tmp_path: Path
) -> None:
    """head_dim 32 with 4 heads on a width of 64 (not 64 / 4), bf16 weights in several shards
    (model.safetensors.index.json): imported in fp32, the same logits as transformers' fp32."""
    hf_dir = make_checkpoint(
        tmp_path / "hf",
        tokenizer_files,
        head_dim=32,
        dtype=torch.bfloat16,
        max_shard_size="100KB",
    )
    assert (hf_dir / "model.safetensors.index.json").is_file()
    report = import_hf(hf_dir, tmp_path / "run")
    assert report.weight_files > 1 and report.dtypes == ["BF16"]
    assert_same_logits(hf_dir, tmp_path / "run")
    model = read_run_config(tmp_path / "run").model
    assert (model.head_size, model.head_dim, model.n_embd) == (32, 32, 64)


def test_a_tokenizer_json_alone_becomes_the_same_tokenizer(
    tokenizer_files: Path, tmp_path: Path
) -> None:
    """No tokenizer.model: the tokenizer.json (a sentencepiece BPE written out, as minigpt
    exports one) is rebuilt as a sentencepiece model encoding every text as the original."""
    only_json = tmp_path / "tokenizer"
    only_json.mkdir()
    shutil.copy(tokenizer_files / "tokenizer.json", only_json / "tokenizer.json")
    hf_dir = make_checkpoint(tmp_path / "hf", only_json)
    report = import_hf(hf_dir, tmp_path / "run")
    assert report.tokenizer_source == "tokenizer.json" and report.added == {}
    original = Tokenizer.load(tokenizer_files)
    imported = Tokenizer.load(tmp_path / "run")
    assert imported.vocab_size == original.vocab_size
    assert not imported.dummy_prefix and "dummy_prefix" not in imported.meta  # as before
    assert [imported.piece(i) for i in range(600)] == [original.piece(i) for i in range(600)]
    documents = [record["text"] for record in builtin.pretrain_records(40, seed=3)]
    for text in [*TEXTS, *documents]:
        assert imported.encode(text) == original.encode(text), text
        assert imported.decode(imported.encode(text)) == text
    assert imported.special_tokens == original.special_tokens
    assert_same_logits(hf_dir, tmp_path / "run")


@pytest.fixture(scope="module")
def plain_sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentencepiece tokenizer as most are trained (`<unk>`, `<s>`, `</s>` at ids 0-2, none of
    minigpt's chat pieces) with minigpt's normalisation: 600 pieces."""
    folder = tmp_path_factory.mktemp("plain-sp")
    texts = [r["text"] for r in builtin.pretrain_records(300)]
    (folder / "tokenizer.model").write_bytes(_train_sentencepiece(texts, dummy_prefix=False))
    return folder


def _train_sentencepiece(texts: list[str], *, dummy_prefix: bool) -> bytes:
    """A 600-piece sentencepiece BPE model as Llama's was trained (byte fallback, digits split,
    identity normalisation, no whitespace squeezing), with or without the dummy prefix."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.98,
        num_threads=1,
        minloglevel=3,
    )
    return buffer.getvalue()


def test_the_chat_pieces_a_tokenizer_lacks_are_added_and_sft_round_trips(
    plain_sentencepiece: Path, tmp_path: Path
) -> None:
    """`<s>`/`</s>` become minigpt's begin/end of text (same ids, same rows); the five pieces
    missing get new rows; `sft --from` trains the imported run; `export --format hf` of the
    fine-tuned run loads in transformers with exactly the fine-tuned logits."""
    hf_dir = make_checkpoint(tmp_path / "hf", plain_sentencepiece)
    run = tmp_path / "imported"
    result = run_cli("import", hf_dir, "--out", run)
    assert result.returncode == 0, result.stderr
    assert "<s> -> <|begin_of_text|>" in result.stdout and f"minigpt sft --from {run}" in (
        result.stdout
    )
    tokenizer = Tokenizer.load(run)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 605)
    added = read_state(run)["sources"]["added_tokens"]
    assert sorted(added) == sorted(
        SPECIAL_TOKENS[n] for n in ("pad", "system", "user", "assistant", "eot")
    )
    assert sorted(added.values()) == list(range(600, 605))
    assert_same_logits(hf_dir, run, vocab=600)  # the checkpoint's ids compute as before
    weights = load_file(str(run / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    assert torch.allclose(embed[600], embed[:600].mean(dim=0))
    sft = tmp_path / "sft"
    flags = ["--max-steps", "3", "--precision", "fp32", "--device", "cpu", "--threads", "1"]
    result = run_cli("sft", "--from", run, "--out", sft, *flags, *set_args(FINETUNE_SETS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "was imported from" in result.stdout + result.stderr  # no built-in text claimed
    tuned = load_run(sft)
    assert tuned.state["chat"] is True and tuned.tokenizer.vocab_size == 605
    export_run(sft, "hf", tmp_path / "back")
    theirs = _hf_model(tmp_path / "back")
    ids = torch.tensor([user_prompt("What is 2 + 3?", tokenizer)])  # the chat template's ids
    with torch.no_grad():
        expected = tuned.model(ids)
        assert not torch.allclose(expected, load_run(run).model(ids), atol=1e-4)  # sft moved it
        assert torch.allclose(theirs(ids).logits, expected, atol=1e-4, rtol=0)


def test_spare_embedding_rows_take_the_missing_pieces(
    plain_sentencepiece: Path, tmp_path: Path
) -> None:
    """A checkpoint whose embedding has more rows (612) than its tokenizer pieces (600): the
    pieces minigpt adds take spare rows (no growth), the rows left get reserved control pieces,
    and the checkpoint's own file is left as it was."""
    hf_dir = make_checkpoint(
        tmp_path / "hf", plain_sentencepiece, vocab_size=612, tie_word_embeddings=True
    )
    before = (hf_dir / "model.safetensors").read_bytes()
    report = import_hf(hf_dir, tmp_path / "run")
    assert sorted(report.added.values()) == list(range(600, 605)) and report.reserved == 7
    tokenizer = Tokenizer.load(tmp_path / "run")
    assert tokenizer.vocab_size == 612 and tokenizer.piece(611) == "<|reserved_6|>"
    assert tokenizer.is_control(611) and tokenizer.encode("<|reserved_6|>") != [611]
    assert_same_logits(hf_dir, tmp_path / "run", vocab=600)
    assert (hf_dir / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("verb", "flags"),
    [
        ("dpo", ["--max-steps", "2"]),
        ("rlhf", ["--max-steps", "1", "--reward", "rule"]),
        ("generate", ["--prompt", "Once upon a time", "--greedy", "-n", "8"]),
    ],
)
def test_the_other_verbs_take_an_imported_run(
    verb: str, flags: list[str], tokenizer_files: Path, tmp_path: Path
) -> None:
    """dpo and rlhf start from it as from a pretraining run; generate decodes it."""
    hf_dir = make_checkpoint(tmp_path / "hf", tokenizer_files, tie_word_embeddings=True)
    import_hf(hf_dir, tmp_path / "imported")
    common = ["--threads", "1"]
    if verb == "generate":
        result = run_cli(verb, tmp_path / "imported", *flags, *common)
    else:
        out = ["--out", tmp_path / verb, "--precision", "fp32", "--device", "cpu"]
        result = run_cli(
            verb, "--from", tmp_path / "imported", *out, *flags, *common, *set_args(RLHF_SETS)
        )
    assert result.returncode == 0, result.stdout + result.stderr
    if verb != "generate":
        assert read_state(tmp_path / verb)["finished"] is True


@pytest.mark.parametrize(
    "shape",
    [
        {"n_layer": 2, "n_head": 2, "n_embd": 32},
        {"n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "tie_embeddings": False},
        {"n_layer": 1, "n_head": 4, "n_embd": 64, "head_size": 32, "intermediate_size": 40},
    ],
)
def test_the_expected_shapes_are_the_networks(shape: dict[str, Any]) -> None:
    """The import checks headers against shapes written out by hand: they must be exactly what
    the network holds, name for name."""
    model = ModelConfig(**shape)
    network = GPT(model, 333).export_state_dict()
    assert expected_shapes(model, 333) == {k: list(v.shape) for k, v in network.items()}


def test_the_streamed_weights_file_is_the_one_save_tensors_writes(tmp_path: Path) -> None:
    """The import writes a run's weights one tensor at a time (one copy of the weights in
    memory, not three): byte for byte the file every run's weights are."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.1.mlp.up_proj.weight": torch.randn(7, 3, generator=generator).t(),
        "model.embed_tokens.weight": torch.randn(5, 4, generator=generator),
        "model.norm.weight": torch.randn(4, generator=generator),
        "empty": torch.zeros(0, 3),
    }
    save_tensors(tmp_path / "expected", dict(tensors), {"format": "minigpt", "step": "0"})
    hf_import._save_weights(tmp_path / "streamed", dict(tensors))
    assert (tmp_path / "streamed").read_bytes() == (tmp_path / "expected").read_bytes()


# ------------------------------------------------------- sentencepiece's dummy prefix (Llama 2)

# Texts a dummy prefix meets at its edges: a leading space or newline, nothing at all, Chinese,
# digits or an emoji first, besides `TEXTS`.
PREFIX_TEXTS = [
    *TEXTS,
    "",
    " one leading space",
    "  two leading spaces",
    "\n a newline first",
    "中文开头, then English",
    "2024 starts with digits",
    "😀 starts with an emoji",
    "x",
]


def _llama_tokenizer_json(model_bytes: bytes) -> dict[str, Any]:
    """The `tokenizer.json` transformers 4's Llama converter wrote for Llama 2 (and TinyLlama):
    the pieces with "▁", every split ranked by the merged piece's id, the normaliser
    Prepend("▁") + Replace(" ", "▁") (sentencepiece's dummy prefix), Llama's decoder."""
    model = SentencePieceModel.from_bytes(model_bytes)
    vocab = {piece.text: index for index, piece in enumerate(model.pieces)}
    mergeable = {piece.text for piece in model.pieces if piece.type == NORMAL}
    space = "\u2581"
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": index,
                "content": piece.text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for index, piece in enumerate(model.pieces)
            if piece.type != NORMAL and piece.type != BYTE
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": space},
                {"type": "Replace", "pattern": {"String": " "}, "content": space},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": space}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": hf_tokenizer._merges(vocab, mergeable),
        },
    }


@pytest.fixture(scope="module")
def llama_sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600-piece tokenizer trained as Llama 2's was: sentencepiece BPE with its default dummy
    prefix, byte fallback, digits split, identity normalisation, no whitespace squeezing,
    `<unk>`/`<s>`/`</s>` at ids 0-2, trained on lines (so, like Llama 2's, no piece holds a
    newline). The folder holds it as a Llama checkpoint does: tokenizer.model, the tokenizer.json
    transformers 4 converted it to, and a LlamaTokenizerFast tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("llama-sp")
    lines = [
        line
        for record in builtin.pretrain_records(300)
        for line in record["text"].split("\n")
        if line
    ]
    model = _train_sentencepiece(lines, dummy_prefix=True)  # sentencepiece's default
    (folder / "tokenizer.model").write_bytes(model)
    (folder / "tokenizer.json").write_text(json.dumps(_llama_tokenizer_json(model)))
    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "legacy": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _sentencepiece(folder: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def test_a_dummy_prefix_tokenizer_imports_with_sentencepieces_own_ids(
    llama_sentencepiece: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's tokenizer gives the ids real sentencepiece gives with its dummy prefix on (and
    the checkpoint's tokenizer.json through the `tokenizers` library), decodes them back, encodes
    whole documents through the token shards line by line with the same ids, and the imported
    weights compute transformers' logits."""
    hf_dir = make_checkpoint(tmp_path / "hf", llama_sentencepiece)
    report = import_hf(hf_dir, tmp_path / "run")
    assert report.renamed == {"<s>": SPECIAL_TOKENS["bos"], "</s>": SPECIAL_TOKENS["eos"]}
    assert report.dummy_prefix and read_state(tmp_path / "run")["sources"]["tokenizer_dummy_prefix"]
    ours = Tokenizer.load(tmp_path / "run")
    assert ours.dummy_prefix and ours.meta["dummy_prefix"] is True
    # The run's file keeps the flag; the copy that encodes differs from it in that flag alone.
    model = (tmp_path / "run" / "tokenizer.model").read_bytes()
    cleared = without_dummy_prefix(model)
    assert cleared is not None and has_dummy_prefix(model) and not has_dummy_prefix(cleared)
    assert (
        SentencePieceModel.from_bytes(cleared).pieces == SentencePieceModel.from_bytes(model).pieces
    )
    assert ours.splits_at_newlines  # the shards below take the line-by-line path
    theirs = _sentencepiece(llama_sentencepiece)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(llama_sentencepiece / "tokenizer.json")
    )
    llama = transformers.AutoTokenizer.from_pretrained(llama_sentencepiece)
    documents = [record["text"] for record in builtin.pretrain_records(40, seed=3)]
    for text in [*PREFIX_TEXTS, *documents]:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        if "\u2581" in text:  # minigpt spells a literal one as bytes; sentencepiece as a space
            continue
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids)
        assert fast(text, add_special_tokens=False)["input_ids"] == ids, text
        if not text[:1].isspace():
            # transformers 5 rebuilds a Llama tokenizer with a Metaspace pre-tokeniser, which
            # adds no prefix before a leading space: only there does it differ.
            assert llama(text, add_special_tokens=False)["input_ids"] == ids, text
    # Text that continues earlier text has no prefix: sentencepiece's ids of it after a word.
    after_x = theirs.encode("x Hello world")[len(theirs.encode("x")) :]
    assert ours.encode(" Hello world", continuation=True) == after_x
    # Documents of several lines, and one cut into chunks and batches: each document's ids are
    # sentencepiece's ids of it whole, then end of text.
    expected = [i for text in documents for i in [*theirs.encode(text), ours.eos_id]]
    assert encode_texts_to_array(ours, documents, 1).tolist() == expected
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = "\n".join(documents)
    (corpus / "a.txt").write_text(lines)
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    monkeypatch.setattr(shards, "_BATCH_BYTES", 200)  # many batches, documents across them
    encode_to_shards(ours, [corpus / "a.txt", corpus / "b.jsonl"], tmp_path / "shards")
    stored = TokenShards(tmp_path / "shards")
    assert stored[0 : len(stored)].tolist() == [*theirs.encode(lines), ours.eos_id, *expected]
    assert_same_logits(hf_dir, tmp_path / "run", vocab=600)
    # Bits per byte count the documents' bytes, not the space each prefix stands for.
    score = score_text(load_run(tmp_path / "run").model, ours, ["", *documents])
    assert score.bytes == sum(len(text.encode("utf-8")) for text in documents)


def test_a_llama_tokenizer_json_alone_is_the_same_tokenizer(
    llama_sentencepiece: Path, tmp_path: Path
) -> None:
    """Without tokenizer.model, Llama 2's tokenizer.json (Prepend + Replace normaliser) becomes
    the sentencepiece model it was converted from: the same pieces, the same dummy prefix."""
    only_json = tmp_path / "tokenizer"
    only_json.mkdir()
    shutil.copy(llama_sentencepiece / "tokenizer.json", only_json / "tokenizer.json")
    import_hf(make_checkpoint(tmp_path / "hf", only_json), tmp_path / "from-json")
    import_hf(make_checkpoint(tmp_path / "hf2", llama_sentencepiece), tmp_path / "from-model")
    from_json = Tokenizer.load(tmp_path / "from-json")
    from_model = Tokenizer.load(tmp_path / "from-model")
    assert from_json.dummy_prefix and from_json.vocab_size == from_model.vocab_size
    size = from_model.vocab_size
    assert [from_json.piece(i) for i in range(size)] == [from_model.piece(i) for i in range(size)]
    for text in PREFIX_TEXTS:
        assert from_json.encode(text) == from_model.encode(text), text


def test_a_reply_cut_at_a_stop_string_keeps_where_the_prefix_goes(
    llama_sentencepiece: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Streaming and stop strings with a dummy prefix: a chat reply (after a special token) is
    streamed without the prefix's space, a continuation of text with its spaces, and the ids
    kept before a stop string decode in place to exactly the text shown."""
    hf_dir = make_checkpoint(tmp_path / "hf", llama_sentencepiece)
    code, stdout, _ = _run_main(monkeypatch, capsys, "import", hf_dir, "--out", tmp_path / "run")
    assert code == 0 and "tokenizer from tokenizer.model, with its dummy prefix" in stdout
    tokenizer = Tokenizer.load(tmp_path / "run")
    chat = user_prompt("Where is Paris?", tokenizer)
    plain = [tokenizer.eos_id, *tokenizer.encode("The capital of France")]
    for prompt, reply in (
        (chat, tokenizer.encode("Paris is in France. Yes.")),
        (plain, tokenizer.encode(" is Paris. Yes.", continuation=True)),
    ):
        for stop in ("Yes", "is", "ari", ". "):
            stream = TextStream(tokenizer, (stop,), prompt)
            shown = "".join(stream.push(token) for token in reply) + stream.finish()
            whole = tokenizer.decode([*prompt, *reply])[len(tokenizer.decode(prompt)) :]
            assert shown == whole[: whole.index(stop)], (stop, shown)
            kept = stream.ids_before_stop()
            assert tokenizer.decode([*prompt, *kept]) == tokenizer.decode(prompt) + shown
    stream = TextStream(tokenizer, (), chat)
    assert "".join(stream.push(t) for t in tokenizer.encode("Paris")) == "Paris"


def test_a_dummy_prefix_run_fine_tunes_and_exports_with_the_same_ids(
    llama_sentencepiece: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Imported, fine-tuned with `sft`, exported with `export --format hf`: transformers'
    AutoTokenizer of the export gives minigpt's ids on every text (leading spaces and a literal
    U+2581 included) and in the chat template, and greedy generation is minigpt's, ids and the
    text `minigpt generate --greedy` prints."""
    run = tmp_path / "imported"
    import_hf(make_checkpoint(tmp_path / "hf", llama_sentencepiece), run)
    sft = tmp_path / "sft"
    flags = ["--max-steps", "3", "--precision", "fp32", "--device", "cpu", "--threads", "1"]
    result = run_cli("sft", "--from", run, "--out", sft, *flags, *set_args(FINETUNE_SETS))
    assert result.returncode == 0, result.stdout + result.stderr
    export_run(sft, "hf", tmp_path / "back")
    exported = json.loads((tmp_path / "back" / "tokenizer.json").read_text())
    assert exported["normalizer"] == {"type": "Prepend", "prepend": " "}
    tuned = load_run(sft)
    ours = tuned.tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "back", local_files_only=True)
    documents = [record["text"] for record in builtin.pretrain_records(20, seed=4)]
    # The exported tokenizer.json imports back as the same tokenizer (dummy prefix included).
    rebuilt = hf_tokenizer_import.from_tokenizer_json(exported, tmp_path / "tokenizer.json")
    again = Tokenizer(rebuilt.to_bytes())
    assert again.dummy_prefix
    for text in [*PREFIX_TEXTS, *documents]:
        assert again.encode(text) == ours.encode(text), text
        if "<|user|>" in text:  # transformers matches a special token in text (documented)
            continue
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == text
    conversation = [
        {"role": "system", "content": "Answer briefly. 简短回答。"},
        {"role": "user", "content": " What is 12 + 34?"},
        {"role": "assistant", "content": "46"},
        {"role": "user", "content": "猫 in English? 😀"},
    ]
    prompt = _ids(theirs.apply_chat_template(conversation, add_generation_prompt=True))
    assert prompt == prompt_ids(conversation, ours)
    model = _hf_model(tmp_path / "back")
    for ids in (user_prompt(" 猫 in English?", ours), [ours.eos_id, *ours.encode(PROMPTS[0])]):
        with torch.no_grad():
            assert torch.allclose(
                model(torch.tensor([ids])).logits, tuned.model(torch.tensor([ids])), atol=1e-4
            )
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)
        assert _without_stop(out[0, len(ids) :].tolist(), ours) == _greedy(tuned, ids, 12)
    question = "Where is Paris?"
    ids = user_prompt(question, ours)
    reply = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids) :]
    printed = run_cli(
        "generate", sft, "--greedy", "--prompt", question, "-n", "12", "--no-echo", "--threads", "1"
    )
    assert printed.returncode == 0, printed.stderr
    # The reply as streamed is the reply decoded (no prefix's space first), as transformers
    # decodes it (on random weights it may hold invalid UTF-8, which each replaces its own way).
    text = _without_stop(reply.tolist(), ours)
    assert printed.stdout == ours.decode(text) + "\n"
    if "\ufffd" not in printed.stdout:
        assert printed.stdout == theirs.decode(text, skip_special_tokens=True) + "\n"


def test_a_dummy_prefix_run_exports_to_gguf_with_a_space_prefix(
    llama_sentencepiece: Path, tmp_path: Path
) -> None:
    """The GGUF file says `add_space_prefix` (gguf's reader, always); llama.cpp itself, when
    built, tokenizes as minigpt (text, and the chat template with its special tokens) and
    continues greedily as minigpt does."""
    gguf = pytest.importorskip("gguf")
    run = tmp_path / "imported"
    import_hf(make_checkpoint(tmp_path / "hf", llama_sentencepiece), run)
    export_run(run, "gguf", tmp_path / "llama.gguf", dtype="f32")
    reader = gguf.GGUFReader(tmp_path / "llama.gguf")
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    module, reason = llama_cpp_build.load(build_if_missing=False)
    if module is None:
        pytest.skip(reason)
    from tests.test_export_gguf import _llama, _llama_greedy

    loaded = load_run(run)
    ours = loaded.tokenizer
    llm = _llama(module, tmp_path / "llama.gguf", 64)
    documents = [record["text"] for record in builtin.pretrain_records(20, seed=4)]
    for text in [*PREFIX_TEXTS, *documents]:
        if "\u2581" in text or not text:  # llama.cpp reads a literal one as its space sign
            continue
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(text)
    rendered = ours.decode(user_prompt("Where is Paris?", ours), keep_special=True)
    chat = llm.tokenize(rendered.encode(), add_bos=False, special=True)
    assert chat == user_prompt("Where is Paris?", ours)
    stops = (ours.eos_id, ours.eot_id)
    for prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        assert ids == [ours.eos_id, *ours.encode(prompt)]
        assert _llama_greedy(llm, ids, 12, stops) == _greedy(loaded, ids, 12), prompt


# ------------------------------------------------------------------------------------ refusals


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as copies (not views of the mapped file, which is rewritten)."""
    return {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}


def _drop_tensor(folder: Path, name: str) -> None:
    tensors = _weights(folder)
    del tensors[name]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _pickled_only(folder: Path) -> None:
    torch.save(_weights(folder), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _pickle_named_safetensors(folder: Path) -> None:
    torch.save(_weights(folder), folder / "model.safetensors")


def _squeezing_tokenizer(folder: Path) -> None:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([r["text"] for r in builtin.pretrain_records(200)]),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        character_coverage=0.98,
        normalization_rule_name="identity",
        remove_extra_whitespaces=True,  # sentencepiece's default: "a  b" encodes as "a b"
        num_threads=1,
        minloglevel=3,
    )
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())


def _metaspace_tokenizer(folder: Path) -> None:
    """The tokenizer.json transformers 5 writes for a Llama tokenizer: "▁" pieces, a Metaspace
    pre-tokeniser instead of Llama 2's Prepend + Replace normaliser."""
    (folder / "tokenizer.model").unlink()
    data = json.loads((folder / "tokenizer.json").read_text())
    model = data["model"]
    model["vocab"] = {k.replace(" ", "\u2581"): v for k, v in model["vocab"].items()}
    model["merges"] = [
        [a.replace(" ", "\u2581"), b.replace(" ", "\u2581")] for a, b in model["merges"]
    ]
    data["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "\u2581",
        "prepend_scheme": "always",
        "split": False,
    }
    (folder / "tokenizer.json").write_text(json.dumps(data))


def _byte_level_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.model").unlink()
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False}
    (folder / "tokenizer.json").write_text(json.dumps(data))


REFUSALS: dict[str, tuple[Any, str]] = {
    "no_config": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "mistral": (
        lambda f: _edit_config(f, architectures=["MistralForCausalLM"], model_type="mistral"),
        "architectures",
    ),
    "attention_bias": (lambda f: _edit_config(f, attention_bias=True), "attention_bias"),
    "mlp_bias": (lambda f: _edit_config(f, mlp_bias=True), "mlp_bias"),
    "rope_scaling": (
        lambda f: _edit_config(f, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "rope_scaling",
    ),
    "rope_parameters": (
        lambda f: _edit_config(
            f, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
        ),
        "rope_parameters.rope_type",
    ),
    "gelu": (lambda f: _edit_config(f, hidden_act="gelu"), "hidden_act"),
    "shape": (
        lambda f: _edit_config(f, intermediate_size=128),
        "model.layers.0.mlp.down_proj.weight has shape (64, 96)",
    ),
    "missing_tensor": (
        lambda f: _drop_tensor(f, "model.layers.1.self_attn.k_proj.weight"),
        "missing tensor model.layers.1.self_attn.k_proj.weight",
    ),
    "pickled_bin": (_pickled_only, "pytorch_model.bin: pickled PyTorch weights"),
    "pickle_as_safetensors": (_pickle_named_safetensors, "not safetensors"),
    "squeezing": (_squeezing_tokenizer, "normalizer_spec.remove_extra_whitespaces"),
    "byte_level": (_byte_level_tokenizer, "pre_tokenizer = ByteLevel"),
    "metaspace": (_metaspace_tokenizer, "pre_tokenizer = Metaspace: it adds no"),
    "no_tokenizer": (
        lambda f: [(f / n).unlink() for n in ("tokenizer.model", "tokenizer.json")],
        "no tokenizer.model or tokenizer.json",
    ),
    "vocab": (lambda f: _edit_config(f, vocab_size=500), "config.json's vocab_size is 500"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_minigpt_cannot_represent_is_refused_in_one_line_leaving_nothing(
    case: str,
    tokenizer_files: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hf_dir = make_checkpoint(tmp_path / "hf", tokenizer_files)
    edit, expected = REFUSALS[case]
    edit(hf_dir)

    def never(*_: object, **__: object) -> None:
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr("pickle.load", never)
    monkeypatch.setattr("pickle.loads", never)
    capsys.readouterr()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, stdout, stderr = _run_main(
        monkeypatch, capsys, "import", hf_dir, "--out", tmp_path / "runs" / "imported"
    )
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_existing_run_is_replaced_only_with_overwrite_and_never_other_files(
    tokenizer_files: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hf_dir = make_checkpoint(tmp_path / "hf", tokenizer_files, tie_word_embeddings=True)
    run = tmp_path / "run"
    import_hf(hf_dir, run)
    (run / "stale.txt").write_text("from the earlier run")
    code, _, stderr = _run_main(monkeypatch, capsys, "import", hf_dir, "--out", run)
    assert code == 2 and "already exists" in stderr
    code, stdout, _ = _run_main(monkeypatch, capsys, "import", hf_dir, "--out", run, "--overwrite")
    assert code == 0 and "imported" in stdout
    assert not (run / "stale.txt").exists() and read_state(run)["finished"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # nothing staged left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    code, _, stderr = _run_main(
        monkeypatch, capsys, "import", hf_dir, "--out", other, "--overwrite"
    )
    assert code == 2 and "not a minigpt run" in stderr and (other / "mine.txt").is_file()
    code, _, stderr = _run_main(monkeypatch, capsys, "import", hf_dir, "--out", hf_dir / "run")
    assert code == 2 and "overlaps" in stderr
