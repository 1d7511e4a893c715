"""Generation: sampling filters, beam search by brute force, stops, streaming, and the CLI verb."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from minigpt_cli.config.schema import GenerateConfig, ModelConfig
from minigpt_cli.engine.inference.beam import beam_search
from minigpt_cli.engine.inference.decode import generate, generate_batch
from minigpt_cli.engine.inference.generation import (
    SamplingSettings,
    TextStream,
    apply_repetition_penalty,
    choose_next,
)
from minigpt_cli.engine.inference.rollouts import sample_groups
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.layers import KVCache
from minigpt_cli.errors import UserError

VOCAB = 40
CONTEXT = 32


# One thread for tiny tensors (`conftest.one_thread` says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, vocab: int = VOCAB, **changes) -> GPT:
    values = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_length=CONTEXT)
    values.update(changes)
    torch.manual_seed(seed)
    return GPT(ModelConfig(**values), vocab).eval()


def settings(**changes) -> SamplingSettings:
    values = dict(max_new_tokens=12, temperature=1.0, top_k=None, top_p=None)
    values.update(changes)
    return SamplingSettings(**values)


class PieceTokenizer:
    """A stand-in tokenizer: each id is a byte string; decoding joins the bytes and decodes UTF-8
    with replacement characters, as sentencepiece's byte fallback does for a cut-off character."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        data, ids = text.encode("utf-8"), []
        while data:
            best = max(
                (i for i, p in enumerate(self.pieces) if p and data.startswith(p)),
                key=lambda i: len(self.pieces[i]),
            )
            ids.append(best)
            data = data[len(self.pieces[best]) :]
        return ids


# 40 pieces: "" (0), a-z (1-26), space, newline, and a few multi-character pieces.
PIECES = [b""] + [bytes([c]) for c in range(97, 123)] + [b" ", b"\n", b".\n", b"ab", b"the"]
PIECES += [b"x\n\n", b"!", b"?", b",", b"Hello", b"User", b":", b" hi"]
assert len(PIECES) == VOCAB
TOKENS = PieceTokenizer(PIECES)


def piece_id(piece: bytes) -> int:
    return PIECES.index(piece)


# ------------------------------------------------------------------------------ choose_next


def test_a_draw_takes_each_token_at_its_probability_and_never_an_impossible_one() -> None:
    # Impossible tokens first, between and last: where a running total stands still.
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    logits = probs.log().repeat(8000, 1)
    draws = choose_next(logits, settings(), torch.Generator().manual_seed(4)).tolist()
    assert set(draws) == {1, 3, 4}
    for token in (1, 3, 4):
        assert abs(draws.count(token) / len(draws) - float(probs[token])) < 0.02
    again = choose_next(logits, settings(), torch.Generator().manual_seed(4)).tolist()
    assert again == draws  # the generator decides every draw


def test_top_k_never_samples_outside_the_k_best() -> None:
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(0)).repeat(4000, 1)
    best = set(logits[0].topk(5).indices.tolist())
    draws = choose_next(logits, settings(top_k=5), torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == best  # never outside, and really samples among all five


def test_top_p_never_samples_outside_the_nucleus() -> None:
    probs = torch.tensor([0.05, 0.25, 0.05, 0.4, 0.1, 0.15])
    logits = probs.log().repeat(6000, 1)
    generator = torch.Generator().manual_seed(2)
    draws = choose_next(logits, settings(top_p=0.7), generator).tolist()
    # Smallest set reaching 0.7: 0.4 + 0.25 = 0.65 is not enough, so 0.15 joins.
    assert set(draws) == {3, 1, 5}
    for token, share in ((3, 0.4 / 0.8), (1, 0.25 / 0.8), (5, 0.15 / 0.8)):
        assert abs(draws.count(token) / len(draws) - share) < 0.03
    draws = choose_next(logits, settings(top_p=0.5), generator).tolist()
    assert set(draws) == {3, 1}
    # top-k and top-p together: top-p acts on the top-k survivors, renormalised.
    draws = choose_next(logits, settings(top_k=2, top_p=0.3), generator).tolist()
    assert set(draws) == {3}


def test_greedy_and_zero_temperature_take_the_argmax() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    expected = logits.argmax(-1)
    assert torch.equal(choose_next(logits, settings(greedy=True)), expected)
    assert torch.equal(choose_next(logits, settings(temperature=0.0)), expected)


def test_repetition_penalty_is_ctrl_style() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 3.0]]


def test_strong_repetition_penalty_avoids_repeats() -> None:
    model = make_model()
    plain = generate(model, [1, 2, 3], settings(greedy=True, max_new_tokens=10))
    assert len(set(plain)) < len(plain)  # this random model loops when left alone
    tokens = generate(
        model, [1, 2, 3], settings(greedy=True, max_new_tokens=10, repetition_penalty=1e4)
    )
    assert len(set(tokens)) == len(tokens) and not set(tokens) & {1, 2, 3}


def test_settings_are_validated_and_read_from_config() -> None:
    with pytest.raises(UserError, match="top_p"):
        SamplingSettings(top_p=1.5)
    with pytest.raises(UserError, match="temperature"):
        SamplingSettings(temperature=-1)
    config = GenerateConfig(max_new_tokens=7, top_k=9)
    made = SamplingSettings.from_config(config, temperature=0.3, top_p=None, seed=4)
    assert (made.max_new_tokens, made.top_k, made.temperature, made.seed) == (7, 9, 0.3, 4)
    assert made.top_p == config.top_p  # None overrides mean "keep the config's value"


# ------------------------------------------------------------------------------ decoding loop


def reference_greedy(model: GPT, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by full forward passes (no cache), the same sliding policy as generate."""
    ctx, keep = model.config.context_length, int(model.config.context_length * 0.75)
    history, start, out = list(prompt[-ctx:]), 0, []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([history[start:]]))[0, -1]
            token = int(logits.argmax())
            out.append(token)
            if len(history) - start == ctx:  # the cache was full: the window slides
                start = len(history) + 1 - keep
            history.append(token)
    return out


def test_cached_greedy_equals_full_forward_greedy() -> None:
    model = make_model(seed=5)
    prompt = [4, 9, 2, 7]
    assert generate(model, prompt, settings(greedy=True, max_new_tokens=20)) == reference_greedy(
        model, prompt, 20
    )


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_the_decode_step_equals_the_module_forward(kv_heads: int) -> None:
    from minigpt_cli.engine.model.stepper import DecodeStep

    model = make_model(seed=kv_heads, n_kv_head=kv_heads)
    step = DecodeStep.for_model(model)
    assert isinstance(step, DecodeStep)  # plain fp32 modules in eval mode: the fast path
    ids = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    with torch.inference_mode():
        fast, slow = model.new_kv_cache(2), model.new_kv_cache(2)
        model(ids[:, :2], kv_cache=fast), model(ids[:, :2], kv_cache=slow)
        for position in range(2, ids.shape[1]):
            got = step(ids[:, position], fast)
            want = model(ids[:, position : position + 1], kv_cache=slow)[:, -1]
            # Only the matrix products' summation order differs: float rounding, not more.
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert fast.length == slow.length == position + 1
        for mine, theirs in zip(fast.keys + fast.values, slow.keys + slow.values, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_fast_greedy_tokens_equal_the_no_cache_forward(seed: int) -> None:
    model = make_model(seed=10 + seed, n_kv_head=2 if seed % 2 else 4)
    prompt = torch.randint(0, VOCAB, (3 + seed,), generator=torch.Generator().manual_seed(seed))
    tokens = generate(model, prompt.tolist(), settings(greedy=True, max_new_tokens=40))
    assert tokens == reference_greedy(model, prompt.tolist(), 40)  # past the context, too


def test_the_decode_step_falls_back_where_it_cannot_run_exactly() -> None:
    from minigpt_cli.config.schema import LoraConfig
    from minigpt_cli.engine.model.lora import apply_lora
    from minigpt_cli.engine.model.stepper import DecodeStep

    model = make_model()
    assert not isinstance(DecodeStep.for_model(model.train()), DecodeStep)  # dropout, grads
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not isinstance(DecodeStep.for_model(model), DecodeStep)
    apply_lora(model, LoraConfig(r=2, targets=["q_proj"]))
    step = DecodeStep.for_model(model)
    assert not isinstance(step, DecodeStep)
    with torch.inference_mode():
        cache = model.new_kv_cache(1)
        model(torch.tensor([[1, 2]]), kv_cache=cache)
        logits = step(torch.tensor([3]), cache)
    assert logits.shape == (1, VOCAB) and cache.length == 3


def test_generation_slides_past_the_context_and_cuts_long_prompts() -> None:
    model = make_model(seed=6)
    long_prompt = [(7 * i) % VOCAB for i in range(50)]
    tokens = generate(model, long_prompt, settings(greedy=True, max_new_tokens=40))
    assert len(tokens) == 40  # 32-token context, yet all 40 tokens come
    assert tokens == reference_greedy(model, long_prompt, 40)
    assert tokens[:5] == generate(model, long_prompt[-CONTEXT:], settings(greedy=True))[:5]


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    model = make_model()
    first = generate(model, [1, 2], settings(seed=11, max_new_tokens=16))
    assert first == generate(model, [1, 2], settings(seed=11, max_new_tokens=16))
    others = {tuple(generate(model, [1, 2], settings(seed=s, max_new_tokens=16))) for s in range(5)}
    assert len(others) > 1


def test_stops_at_a_stop_id() -> None:
    model = make_model()
    full = generate(model, [1, 2], settings(seed=3, max_new_tokens=20))
    k = next(i for i in range(3, 20) if full[i] not in full[:i])
    stopped = generate(model, [1, 2], settings(seed=3, max_new_tokens=20, stop_ids=(full[k],)))
    assert stopped == full[:k]


def test_stops_at_a_stop_string_and_trims_before_it() -> None:
    model = make_model(seed=1)
    base = settings(seed=7, max_new_tokens=24, top_k=12)
    full = generate(model, [1, 2], base)
    text = TOKENS.decode(full)
    stop = text[8:10]
    cut = text.find(stop)
    seen: list[int] = []
    result = generate(
        model,
        [1, 2],
        settings(seed=7, max_new_tokens=24, top_k=12, stop_strings=(stop,)),
        tokenizer=TOKENS,
        on_token=seen.append,
    )
    assert TOKENS.decode(result) == text[:cut]
    assert stop not in TOKENS.decode(result)
    assert seen == full[: len(seen)] and len(seen) < len(full)  # it really stopped early


def test_stop_strings_need_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        generate(make_model(), [1], settings(stop_strings=("x",)))


def test_batch_generation_rows_are_independent_and_deterministic() -> None:
    model = make_model()
    greedy_rows = generate_batch(model, [3, 4], settings(greedy=True), 3)
    assert greedy_rows == [generate(model, [3, 4], settings(greedy=True))] * 3
    sampled = generate_batch(model, [3, 4], settings(seed=2, max_new_tokens=10), 4)
    assert sampled == generate_batch(model, [3, 4], settings(seed=2, max_new_tokens=10), 4)
    assert len({tuple(row) for row in sampled}) > 1
    streamed: dict[int, list[int]] = {}
    stop = sampled[0][4]
    rows = generate_batch(
        model,
        [3, 4],
        settings(seed=2, max_new_tokens=10, stop_ids=(stop,)),
        4,
        on_token=lambda row, token: streamed.setdefault(row, []).append(token),
    )
    for row, full in zip(rows, sampled, strict=True):
        expected = full[: full.index(stop)] if stop in full else full
        assert row == expected  # each row stops on its own; the others carry on
    assert [streamed.get(i, []) for i in range(4)] == rows


def test_grouped_rollouts_draw_what_each_prompt_alone_draws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RL's rollouts decode every prompt's group in one batch (prompts of different lengths);
    each group draws from its own seed, so it samples what `generate_batch` samples for that
    prompt alone, stop ids end a row without ending its group, and a group whose rows have all
    stopped leaves the batch (its cache rows dropped) without changing the others' draws."""
    kept: list[int] = []
    keep_rows = KVCache.keep_rows
    monkeypatch.setattr(
        KVCache, "keep_rows", lambda cache, rows: (kept.append(len(rows)), keep_rows(cache, rows))
    )
    model = make_model()
    prompts = [[3, 4], [5, 6, 7, 8, 9], [1], [2, 9, 9]]
    seeds = [11, 12, 13, 14]
    base = settings(max_new_tokens=10)
    alone = [
        generate_batch(model, prompt, settings(max_new_tokens=10, seed=seed), 3)
        for prompt, seed in zip(prompts, seeds, strict=True)
    ]
    assert sample_groups(model, prompts, base, 3, seeds) == alone
    stop = alone[1][0][2]
    with_stop = settings(max_new_tokens=10, stop_ids=(stop,))
    stopped = sample_groups(model, prompts, with_stop, 3, seeds)
    for group, full_group in zip(stopped, alone, strict=True):
        for row, full in zip(group, full_group, strict=True):
            assert row == (full[: full.index(stop)] if stop in full else full)
    assert len({tuple(row) for group in alone for row in group}) > 4  # really sampled
    assert kept and kept[0] < 4 * 3  # the batch shrank as groups stopped
    with pytest.raises(ValueError, match="context"):
        sample_groups(model, [[1] * (CONTEXT - 5)], base, 2, [0])


def test_generation_restores_training_mode_and_works_in_bf16() -> None:
    model = make_model().train()
    generate(model, [1], settings(max_new_tokens=3, seed=0))
    assert model.training
    model = make_model().to(torch.bfloat16)
    assert len(generate(model, [1, 2], settings(greedy=True, max_new_tokens=5))) == 5
    assert model.new_kv_cache(1).keys[0].dtype == torch.bfloat16


# ------------------------------------------------------------------------------ beam search


def brute_force_best(model: GPT, prompt: list[int], steps: int, eos: int, alpha: float):
    """Every continuation of up to `steps` tokens (eos only last), scored as beam search does."""
    with torch.no_grad():
        scored = []
        for length in range(1, steps + 1):
            for seq in itertools.product(range(model.vocab_size), repeat=length):
                if eos in seq[:-1] or (length < steps and seq[-1] != eos):
                    continue
                logits = model(torch.tensor([prompt + list(seq)]))[0].double()
                logp = F.log_softmax(logits, dim=-1)
                total = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(seq))
                scored.append((total / length**alpha, list(seq)))
    scored.sort(key=lambda item: item[0], reverse=True)
    return scored


@pytest.mark.parametrize("alpha", [1.0, 0.0, 2.0])
def test_beam_search_finds_the_best_sequence_by_brute_force(alpha: float) -> None:
    model = make_model(seed=3, vocab=6, init_std=0.4)
    prompt, eos = [1, 4], 0
    scored = brute_force_best(model, prompt, 3, eos, alpha)
    assert scored[0][0] - scored[1][0] > 1e-4  # a unique optimum, so the check is meaningful
    best = scored[0][1]
    expected = best[:-1] if best[-1] == eos else best
    # 36 beams keep every 2-token prefix of a 6-token vocabulary, so the search is exhaustive.
    assert beam_search(model, prompt, 36, 3, alpha, [eos]) == expected


def test_length_penalty_changes_what_beam_search_prefers() -> None:
    model = make_model(seed=3, vocab=6, init_std=0.4)
    results = {alpha: beam_search(model, [1, 4], 36, 3, alpha, [0]) for alpha in (0.0, 4.0)}
    for alpha, result in results.items():
        best = brute_force_best(model, [1, 4], 3, 0, alpha)[0][1]
        assert result == (best[:-1] if best[-1] == 0 else best)


def test_one_beam_equals_greedy() -> None:
    model = make_model(seed=2)
    greedy = generate(model, [5, 6], settings(greedy=True, max_new_tokens=15, stop_ids=(7,)))
    assert beam_search(model, [5, 6], 1, 15, 1.0, [7]) == greedy


def test_beam_search_through_generate_and_past_the_context() -> None:
    model = make_model(seed=4)
    result = generate(model, list(range(30)), settings(num_beams=3, max_new_tokens=10))
    assert len(result) == 10  # no eos: runs to the end, sliding the window on the way
    assert result == beam_search(model, list(range(30)), 3, 10, 1.0, [])
    with pytest.raises(UserError, match="num-samples"):
        generate_batch(model, [1], settings(num_beams=2), 2)


# ------------------------------------------------------------------------------ TextStream


def test_text_stream_holds_back_stop_prefixes_and_cut_characters() -> None:
    tokenizer = PieceTokenizer([b"", b"Hello", b".\n", b"\n", b"User", b"\xc3", b"\xa9", b"x\n\n"])
    stream = TextStream(tokenizer, stop_strings=("\n\n",))
    assert stream.push(1) == "Hello"
    assert stream.push(2) == "."  # "\n" could be the start of "\n\n"
    assert stream.push(5) == ""  # half a character: nothing is stable yet
    assert stream.push(6) == "\né"  # "\né" cannot start "\n\n" any more
    assert stream.push(3) == ""
    assert stream.push(3) == "" and stream.stopped  # "\n\n" complete: never shown
    assert stream.push(4) == ""
    assert stream.visible_text() == "Hello.\né"
    assert tokenizer.decode(stream.ids_before_stop()) == "Hello.\né"


def test_text_stream_cuts_a_token_that_straddles_the_stop_string() -> None:
    stream = TextStream(TOKENS, stop_strings=("\n\n", "User:"))
    shown = "".join(stream.push(piece_id(p)) for p in (b"Hello", b" hi", b"x\n\n", b"!"))
    assert shown == "Hello hix" and stream.stopped
    ids = stream.ids_before_stop()
    assert TOKENS.decode(ids) == "Hello hix"
    assert ids[:2] == [piece_id(b"Hello"), piece_id(b" hi")]
    other = TextStream(TOKENS, stop_strings=("User:",))
    parts = [other.push(piece_id(p)) for p in (b"Hello", b"\n", b"User", b"!", b"User", b":")]
    assert "".join(parts) == "Hello\nUser!" and other.finish() == ""


def test_text_stream_flushes_held_text_at_the_end() -> None:
    stream = TextStream(TOKENS, stop_strings=("\n\n",))
    assert stream.push(piece_id(b"Hello")) + stream.push(piece_id(b"\n")) == "Hello"
    assert stream.finish() == "\n" and not stream.stopped


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory built by hand: tokenizer, config, state and random weights.

    Assumes the run-directory contract (README "The run directory") as
    `engine.runs.load.load_run` reads it.
    """
    from minigpt_cli.config.loader import dump_config
    from minigpt_cli.config.schema import Config, TokenizerConfig
    from minigpt_cli.datasets.builtin import pretrain_records
    from minigpt_cli.engine.data.tokenizer import Tokenizer
    from minigpt_cli.engine.data.tokenizer_training import train_tokenizer
    from minigpt_cli.engine.runs.files import save_tensors

    folder = tmp_path_factory.mktemp("generate") / "run"
    texts = [record["text"] for record in pretrain_records(300, seed=0)]
    train_tokenizer(texts, 400, folder, num_threads=1)
    tokenizer = Tokenizer.load(folder)
    model_cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_length=64)
    config = Config(
        model=model_cfg,
        tokenizer=TokenizerConfig(vocab_size=tokenizer.vocab_size),
        generate=GenerateConfig(max_new_tokens=12),
    )
    (folder / "config.toml").write_text(dump_config(config), encoding="utf-8")
    torch.manual_seed(0)
    model = GPT(model_cfg, tokenizer.vocab_size)
    save_tensors(folder / "model.safetensors", model.export_state_dict(), {"step": "0"})
    state = {"step": 0, "files": ["model.safetensors"], "finished": True, "chat": False}
    (folder / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    return folder


def invoke(*args: str, input_text: str | None = None):
    from minigpt_cli.cli.app import app

    return CliRunner().invoke(app, ["generate", *map(str, args)], input=input_text)


def test_cli_streams_a_seeded_continuation(run_dir: Path) -> None:
    first = invoke(run_dir, "--prompt", "The cat", "--seed", "5", "--verbose")
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("The cat") and len(first.stdout) > len("The cat\n")
    assert "tokens/s" in first.stderr
    again = invoke(run_dir, "--prompt", "The cat", "--seed", "5")
    assert again.stdout == first.stdout
    other = invoke(run_dir, "--prompt", "The cat", "--seed", "6", "--no-echo")
    assert other.exit_code == 0 and not other.stdout.startswith("The cat")


def test_cli_greedy_stop_string_and_stdin(run_dir: Path) -> None:
    from minigpt_cli.engine.runs.load import load_run

    loaded = load_run(run_dir)
    tokenizer = loaded.tokenizer
    ids = [tokenizer.eos_id, *tokenizer.encode("Once upon")]
    stop_ids = (tokenizer.eos_id, tokenizer.eot_id)
    full = generate(loaded.model, ids, settings(greedy=True, max_new_tokens=20, stop_ids=stop_ids))
    stream = TextStream(tokenizer, (), ids)
    text = "".join(stream.push(t) for t in full) + stream.finish()
    stop = text[6:9]
    expected = text[: text.find(stop)]
    result = invoke(run_dir, "--greedy", "-n", "20", "--stop", stop, input_text="Once upon")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Once upon" + expected + "\n"


def test_cli_samples_and_beams(run_dir: Path) -> None:
    samples = invoke(run_dir, "-p", "A", "--num-samples", "3", "--seed", "1", "--top-k", "0")
    assert samples.exit_code == 0, samples.output
    assert samples.stdout.count("-" * 15 + "\n") == 2
    beam_args = ("-p", "A", "--num-beams", "3", "--length-penalty", "0.5")
    beams = invoke(run_dir, *beam_args)
    assert beams.exit_code == 0, beams.output
    assert beams.stdout.startswith("A") and beams.stdout == invoke(run_dir, *beam_args).stdout
    # One beam is greedy (deterministic, as --help says), not the run's default sampling.
    one_beam = invoke(run_dir, "-p", "A", "-n", "12", "--num-beams", "1", "--seed", "3")
    greedy = invoke(run_dir, "-p", "A", "-n", "12", "--greedy")
    assert one_beam.exit_code == 0 and one_beam.stdout == greedy.stdout


def test_cli_errors_are_one_line_with_exit_status_2(run_dir: Path, tmp_path: Path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "minigpt_cli", "generate", str(tmp_path / "nope"), "-p", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = invoke(run_dir, "-p", "x", "--num-beams", "2", "--num-samples", "2")
    assert isinstance(bad.exception, UserError)
    bad = invoke(run_dir, "-p", "x", "--top-p", "1.5")
    assert isinstance(bad.exception, UserError) and "top_p" in str(bad.exception)


def test_cli_reports_a_prompt_longer_than_the_context(run_dir: Path) -> None:
    result = invoke(run_dir, "-p", "word " * 200, "-n", "3", "--greedy", "--no-echo")
    assert result.exit_code == 0, result.output
    assert "the model sees its last 64" in result.stderr
    assert result.stdout.endswith("\n")


def test_text_stream_with_the_real_tokenizer_rebuilds_unicode(run_dir: Path) -> None:
    from minigpt_cli.engine.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(run_dir)
    text = "Zoë said 你好, 世界 😀 naïve\n\nend"
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("Start: ")
    stream = TextStream(tokenizer, (), prompt)
    parts = [stream.push(token) for token in ids]
    assert not any("\ufffd" in part for part in parts)  # never half a character
    assert "".join(parts) + stream.finish() == text
    stream = TextStream(tokenizer, ("世界",), prompt)
    shown = "".join(stream.push(token) for token in ids)
    assert shown == "Zoë said 你好, " and stream.stopped
    assert tokenizer.decode(stream.ids_before_stop()) == "Zoë said 你好, "


def test_decoding_verbs_take_the_training_verbs_cpu_flags(run_dir: Path) -> None:
    from minigpt_cli.cli.app import app

    for verb in ("generate", "chat", "eval"):
        text = CliRunner().invoke(app, [verb, "--help"], env={"COLUMNS": "200"}).stdout
        assert "--threads" in text and "--max-cpu" in text, verb
    before = torch.get_num_threads()
    try:
        result = invoke(run_dir, "-p", "A", "-n", "3", "--greedy", "--threads", "2", "--verbose")
        assert result.exit_code == 0, result.output
        assert "2 threads" in result.stderr  # --threads beats the one-thread decoding default
        result = invoke(run_dir, "-p", "A", "-n", "3", "--greedy", "--max-cpu", "100", "-v")
        assert result.exit_code == 0 and "1 threads" in result.stderr  # a 2-layer model: one
    finally:
        torch.set_num_threads(before)


def test_decoding_threads_follow_the_cores_idle_now_not_the_load_average(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psutil

    from minigpt_cli.engine.inference import generation

    # A trailing load average from a run that just ended must not cost a thread.
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    monkeypatch.setattr(psutil, "getloadavg", lambda: (2.0, 2.0, 2.0))
    idle = {"cores": 1.8}
    monkeypatch.setattr(generation, "idle_cores", lambda seconds: idle["cores"])
    big = generation._SINGLE_THREAD_DECODE_PARAMS
    assert generation.decode_threads(big, 2) == 2
    assert generation.decode_threads(big, 1) == 1  # the cap
    assert generation.decode_threads(big - 1, 2) == 1  # small models: one thread
    idle["cores"] = 0.6  # another program holds a core and a half
    assert generation.decode_threads(big, 2) == 1
    idle["cores"] = 0.0
    assert generation.decode_threads(big, 2) == 1  # never zero


def test_cpu_flags_lie_over_the_runs_resources_and_bad_values_exit_2(
    run_dir: Path, tmp_path: Path
) -> None:
    from minigpt_cli.cli.decoding import resources_with_flags
    from minigpt_cli.config.schema import ResourcesConfig

    saved = ResourcesConfig(max_cpu=50, threads=None)
    assert resources_with_flags(saved, None, None) == saved
    assert resources_with_flags(saved, 25, 3) == ResourcesConfig(max_cpu=25, threads=3)
    with pytest.raises(UserError, match="--max-cpu 150"):
        resources_with_flags(saved, 150, None)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "minigpt_cli",
            "generate",
            str(run_dir),
            "-p",
            "x",
            "--max-cpu",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: --max-cpu 0: must be above 0 and at most 100 (percent of all logical cores)"
    ]


def test_without_stop_ids_exactly_max_new_tokens_come() -> None:
    model = make_model(seed=3)
    prompt = [4, 9, 2, 7]
    first = generate(model, prompt, settings(greedy=True, max_new_tokens=1))[0]
    stopping = settings(greedy=True, max_new_tokens=30, stop_ids=(first,))
    assert generate(model, prompt, stopping) == []  # the first token is the stop id
    ignoring = settings(greedy=True, max_new_tokens=30, stop_ids=())
    assert len(generate(model, prompt, ignoring)) == 30  # past the 32-token context too


def test_cli_ignore_eos_generates_exactly_n_tokens(run_dir: Path) -> None:
    # The engine side (no stop id ends a row) is the test above; here the flag reaches it.
    for count in (40, 7):
        result = invoke(run_dir, "-p", "A", "-n", str(count), "--greedy", "--ignore-eos", "-v")
        assert result.exit_code == 0, result.output
        assert result.stderr.startswith(f"{count} tokens in "), result.stderr
    beams = invoke(run_dir, "-p", "A", "-n", "9", "--num-beams", "2", "--ignore-eos", "-v")
    assert beams.exit_code == 0 and beams.stderr.startswith("9 tokens in "), beams.stderr


def test_cli_generates_with_int8_weights(run_dir: Path) -> None:
    result = invoke(
        run_dir, "-p", "A", "-n", "6", "--greedy", "--ignore-eos", "--quantize", "int8", "-v"
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("6 tokens in ") and "int8 weights" in result.stderr
