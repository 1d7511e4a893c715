"""`minigpt export --format gguf`, proved twice: `gguf`'s own reader checks the file in every run
(metadata, tensors, tokenizer, chat template, the Ollama Modelfile), and llama.cpp itself
(llama-cpp-python, built once by `tests/llama_cpp_build.py`) loads it and computes what minigpt
computes: the same prompt ids, the same greedy continuations (f32, f16), logits within a measured
tolerance (q8_0), the same chat reply. Without a built llama-cpp-python those tests skip, saying
why. Bad input is refused in one line and leaves nothing behind."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from minigpt_cli.engine.data.chat_template import prompt_ids, user_prompt  # noqa: E402
from minigpt_cli.engine.export import gguf_file  # noqa: E402
from minigpt_cli.engine.export.hf_tokenizer import CHAT_TEMPLATE  # noqa: E402
from minigpt_cli.engine.export.run import export_run  # noqa: E402
from minigpt_cli.engine.runs.files import MODEL_FILE, save_tensors  # noqa: E402
from minigpt_cli.engine.runs.load import LoadedRun, load_run  # noqa: E402
from tests import llama_cpp_build  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from tests.test_export import (  # noqa: E402
    PROMPTS,
    TEXTS,
    _copy_run,
    _greedy,
    _run_main,
    _unfinished,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = ["f32", "f16", "q8_0"]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly. 简短回答。"},
    {"role": "user", "content": "What is 12 + 34?"},
    {"role": "assistant", "content": "46"},
    {"role": "user", "content": "猫 in English? 😀"},
]


@pytest.fixture(scope="module")
def pretrain_gguf(
    tiny_pretrain_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The pretraining run exported once per dtype, in this process: dtype -> file."""
    folder = tmp_path_factory.mktemp("gguf-pretrain")
    files = {}
    for dtype in DTYPES:
        files[dtype] = folder / f"tiny-{dtype}.gguf"
        export_run(tiny_pretrain_run, "gguf", files[dtype], dtype=dtype)
    return files


@pytest.fixture(scope="module")
def chat_gguf(tiny_lora_sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LoRA chat run exported by the command a user types (default dtype)."""
    out = tmp_path_factory.mktemp("gguf-chat") / "chat.gguf"
    result = run_cli("export", tiny_lora_sft_run, "--format", "gguf", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "f16" in result.stdout and "LoRA adapter merged" in result.stdout
    assert "llama-cli -m" in result.stdout and "ollama create chat -f" in result.stdout
    return out


def _fields(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A GGUF file's metadata (key -> value) and tensors (name -> ReaderTensor)."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {tensor.name: tensor for tensor in reader.tensors}


# ------------------------------------------------------------------------- the file, read by gguf


@pytest.mark.parametrize("dtype", DTYPES)
def test_metadata_tensors_and_dtypes(
    dtype: str, pretrain_gguf: dict[str, Path], tiny_pretrain_run: Path
) -> None:
    loaded = load_run(tiny_pretrain_run)
    model = loaded.config.model
    fields, tensors = _fields(pretrain_gguf[dtype])
    file_type = {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    expected = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.file_type": file_type,
        "llama.context_length": 64,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": model.ffn_dim,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 32,
        "llama.attention.value_length": 32,
        "llama.rope.dimension_count": 32,
        "llama.vocab_size": 600,
    }
    assert {key: fields.get(key) for key in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(model.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(model.norm_eps)
    assert fields["general.sampling.temp"] == pytest.approx(loaded.config.generate.temperature)
    assert fields["general.sampling.min_p"] == 0.0
    assert ("general.quantization_version" in fields) == (dtype == "q8_0")

    weights = loaded.model.export_state_dict()
    names = {
        f"blk.{b}.{kind}.weight" for b in range(2) for kind in gguf_file._BLOCK_TENSORS.values()
    }
    assert set(tensors) == names | {"token_embd.weight", "output_norm.weight"}  # tied: no output
    matrix_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    for hf_name, weight in weights.items():
        tensor = tensors[gguf_file.gguf_name(hf_name)]
        assert tuple(reversed(tensor.shape.tolist())) == tuple(weight.shape)  # ggml's order
        is_norm = weight.dim() == 1
        assert tensor.tensor_type.name == ("F32" if is_norm else matrix_type), tensor.name


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_weights_are_minigpts(
    dtype: str, pretrain_gguf: dict[str, Path], tiny_pretrain_run: Path
) -> None:
    """Each tensor dequantised equals minigpt's (queries and keys in llama.cpp's rotary row
    order): exactly for f32, to f16 rounding, and for q8_0 to half a step of each block's scale."""
    loaded = load_run(tiny_pretrain_run)
    heads = {"attn_q": loaded.config.model.n_head, "attn_k": loaded.config.model.kv_heads}
    _, tensors = _fields(pretrain_gguf[dtype])
    for hf_name, weight in loaded.model.export_state_dict().items():
        tensor = tensors[gguf_file.gguf_name(hf_name)]
        kind = tensor.name.split(".")[-2]
        expected = gguf_file.permute_rotary(weight, heads[kind]) if kind in heads else weight
        expected = expected.float().numpy()
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        if tensor.tensor_type.name == "F32":
            np.testing.assert_array_equal(got, expected)
        elif tensor.tensor_type.name == "F16":
            np.testing.assert_array_equal(got, expected.astype(np.float16).astype(np.float32))
        else:
            blocks = np.abs(expected.reshape(-1, 32)).max(axis=1, keepdims=True)
            step = blocks / 127  # one step of the block's 8-bit scale
            error = np.abs(got.reshape(-1, 32) - expected.reshape(-1, 32))
            assert (error <= step * 0.5 + 1e-3 * blocks).all(), tensor.name


def test_the_rotary_permutation_turns_half_split_pairs_into_adjacent_pairs() -> None:
    """Why queries and keys are permuted: minigpt's rope (x·cos + rotate_half(x)·sin, pairs i
    and i + d/2) on W·x equals llama.cpp's (pairs 2i, 2i+1) on permute(W)·x with its output rows
    in the same permuted order, so every attention score q·k is unchanged."""
    torch.manual_seed(0)
    heads, dim, width, pos = 3, 8, 12, 5
    weight, x = torch.randn(heads * dim, width), torch.randn(width)
    freqs = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim) * pos
    cos, sin = torch.cos(freqs).float(), torch.sin(freqs).float()

    def half_split(v: torch.Tensor) -> torch.Tensor:
        v = v.view(heads, dim)
        first, second = v[:, : dim // 2], v[:, dim // 2 :]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=1)

    def adjacent(v: torch.Tensor) -> torch.Tensor:
        v = v.view(heads, dim // 2, 2)
        even, odd = v[..., 0], v[..., 1]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)

    ours = half_split(weight @ x)  # (heads, dim): pairs (i, i + dim/2)
    theirs = adjacent(gguf_file.permute_rotary(weight, heads) @ x)  # (heads, dim/2, 2)
    assert torch.allclose(theirs[..., 0], ours[:, : dim // 2], atol=1e-5)
    assert torch.allclose(theirs[..., 1], ours[:, dim // 2 :], atol=1e-5)


def test_q8_0_keeps_f16_for_rows_it_cannot_hold() -> None:
    """q8_0 stores blocks of 32 along a row: a width that is not a multiple of 32 stays f16,
    said in one note; norms are f32 in every dtype."""
    assert gguf_file.storage_type("blk.0.attn_q.weight", (48, 48), "q8_0") == "F16"
    assert gguf_file.storage_type("blk.0.ffn_down.weight", (48, 128), "q8_0") == "Q8_0"
    assert gguf_file.storage_type("blk.0.attn_norm.weight", (48,), "q8_0") == "F32"
    assert gguf_file.storage_type("output_norm.weight", (64,), "f16") == "F32"
    plan = gguf_file.tensor_plan(
        {
            "model.embed_tokens.weight": torch.zeros(10, 48),
            "model.layers.0.mlp.down_proj.weight": torch.zeros(48, 128),
            "model.norm.weight": torch.zeros(48),
        },
        "q8_0",
    )
    assert [entry.name for entry in plan] == [
        "token_embd.weight",
        "blk.0.ffn_down.weight",
        "output_norm.weight",
    ]
    (note,) = gguf_file.precision_notes(plan, "q8_0")
    assert note.startswith("1 weights kept as f16") and "token_embd.weight" in note
    assert gguf_file.precision_notes(plan, "f16") == []


def _tokenizer_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {key[len("tokenizer.ggml.") :]: v for key, v in fields.items() if "ggml." in key}


def test_the_tokenizer_is_minigpts(pretrain_gguf: dict[str, Path], tiny_pretrain_run: Path) -> None:
    """Every piece, score and type; the special ids; and how a prompt starts: a run that is not
    chat-tuned begins every prompt with <|end_of_text|> (`minigpt generate`'s start), declared as
    the BOS llama.cpp adds; no chat template, so llama.cpp completes text."""
    tokenizer = load_run(tiny_pretrain_run).tokenizer
    fields, _ = _fields(pretrain_gguf["f16"])
    tok = _tokenizer_fields(fields)
    assert tok["model"] == "llama" and tok["pre"] == "default"
    assert tok["tokens"] == [tokenizer.piece(i) for i in range(600)]
    assert tok["scores"] == pytest.approx([tokenizer.score(i) for i in range(600)])
    types = tok["token_type"]
    assert types[tokenizer.unk_id] == 2
    assert {types[i] for i in tokenizer.special_ids} == {3}
    assert [i for i, kind in enumerate(types) if kind == 6] == [
        i for i in range(600) if tokenizer.is_byte(i)
    ]
    assert len([kind for kind in types if kind == 6]) == 256
    assert set(types) == {1, 2, 3, 6}
    assert (tok["bos_token_id"], tok["eos_token_id"], tok["eot_token_id"]) == (
        tokenizer.eos_id,
        tokenizer.eos_id,
        tokenizer.eot_id,
    )
    assert (tok["unknown_token_id"], tok["padding_token_id"]) == (
        tokenizer.unk_id,
        tokenizer.pad_id,
    )
    assert (tok["add_bos_token"], tok["add_eos_token"], tok["add_space_prefix"]) == (
        True,
        False,
        False,
    )
    assert tok["remove_extra_whitespaces"] is False
    assert "tokenizer.chat_template" not in fields


def test_a_chat_run_holds_its_chat_template(chat_gguf: Path, tiny_lora_sft_run: Path) -> None:
    tokenizer = load_run(tiny_lora_sft_run).tokenizer
    fields, tensors = _fields(chat_gguf)
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    tok = _tokenizer_fields(fields)
    assert (tok["bos_token_id"], tok["eos_token_id"], tok["eot_token_id"]) == (
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.eot_id,
    )
    assert tok["add_bos_token"] is True
    assert not any("lora" in name for name in tensors)
    assert "(chat)" in fields["general.description"]
    assert "LoRA adapter merged" in fields["general.description"]


# ----------------------------------------------------------------------- the Ollama Modelfile


def render_go_template(template: str, data: dict[str, Any]) -> str:
    """The part of Go's text/template the Modelfile uses: text, `{{ .Field }}`, `{{ range
    .List }}...{{ end }}` (the dot becomes each element) and `{{-`/`-}}` whitespace trimming."""
    parts = re.split(r"({{-?\s*.*?\s*-?}})", template)
    # Trim markers first: `{{-` eats the whitespace before the action, `-}}` the whitespace after.
    for index, part in enumerate(parts):
        if part.startswith("{{-") and index > 0:
            parts[index - 1] = parts[index - 1].rstrip()
        if part.endswith("-}}") and index + 1 < len(parts):
            parts[index + 1] = parts[index + 1].lstrip()

    def parse(position: int) -> tuple[list[Any], int]:
        nodes: list[Any] = []
        while position < len(parts):
            part = parts[position]
            position += 1
            if not part.startswith("{{"):
                nodes.append(("text", part))
                continue
            action = part.strip("{}").strip("-").strip()
            if action == "end":
                return nodes, position
            if action.startswith("range "):
                body, position = parse(position)
                nodes.append(("range", action.split()[1][1:], body))
            elif re.fullmatch(r"\.\w+", action):
                nodes.append(("field", action[1:]))
            else:
                raise ValueError(f"unsupported template action {part!r}")
        return nodes, position

    def run(nodes: list[Any], dot: dict[str, Any]) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "field":
                out.append(str(dot[node[1]]))
            else:
                out.extend(run(node[2], item) for item in dot[node[1]])
        return "".join(out)

    tree, _ = parse(0)
    return run(tree, data)


def _modelfile(path: Path) -> tuple[list[str], str, dict[str, list[str]]]:
    """A Modelfile's FROM lines, TEMPLATE and PARAMETERs (name -> values)."""
    text = path.read_text()
    (template,) = re.findall(r'^TEMPLATE """(.*?)"""$', text, flags=re.S | re.M)
    parameters: dict[str, list[str]] = {}
    for name, value in re.findall(r"^PARAMETER (\w+) (.+)$", text, flags=re.M):
        parameters.setdefault(name, []).append(value)
    return re.findall(r"^FROM (.+)$", text, flags=re.M), template, parameters


def test_the_modelfile_renders_minigpts_chat_template(
    chat_gguf: Path, tiny_lora_sft_run: Path
) -> None:
    """Ollama's TEMPLATE over a conversation gives minigpt's template text after the BOS (which
    Ollama adds, as the GGUF file says); the stop tokens and defaults are the run's."""
    loaded = load_run(tiny_lora_sft_run)
    tokenizer = loaded.tokenizer
    modelfile = chat_gguf.with_suffix(".Modelfile")
    froms, template, parameters = _modelfile(modelfile)
    assert froms == ["./chat.gguf"]
    ids = prompt_ids(CONVERSATION, tokenizer)
    assert ids[0] == tokenizer.bos_id
    expected = tokenizer.decode(ids[1:], keep_special=True)
    # Ollama's messages are Go structs: Role, Content.
    messages = [{"Role": m["role"], "Content": m["content"]} for m in CONVERSATION]
    assert render_go_template(template, {"Messages": messages}) == expected
    single = [{"Role": "user", "Content": "Hi"}]
    assert (
        render_go_template(template, {"Messages": single})
        == "<|user|>Hi<|end_of_turn|><|assistant|>"
    )
    generate = loaded.config.generate
    assert parameters["stop"] == ['"<|end_of_turn|>"', '"<|end_of_text|>"']
    assert float(parameters["temperature"][0]) == pytest.approx(generate.temperature)
    assert int(parameters["top_k"][0]) == generate.top_k
    assert float(parameters["top_p"][0]) == pytest.approx(generate.top_p)
    assert parameters["num_ctx"] == [str(loaded.config.model.context_length)]
    assert parameters["num_predict"] == [str(generate.max_new_tokens)]


def test_a_completion_models_modelfile_passes_the_prompt_through(
    pretrain_gguf: dict[str, Path],
) -> None:
    froms, template, parameters = _modelfile(pretrain_gguf["q8_0"].with_suffix(".Modelfile"))
    assert froms == ["./tiny-q8_0.gguf"]
    assert render_go_template(template, {"Prompt": "Once upon a time"}) == "Once upon a time"
    assert parameters["stop"] == ['"<|end_of_text|>"']


# -------------------------------------------------------------------------- bad input, atomicity


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown_dtype", "--dtype q4_k: --format gguf writes f32, f16, q8_0"),
        ("dtype_with_hf", "--dtype f16: --format hf writes f32"),
        ("out_exists", "already exists"),
        ("modelfile_exists", "tiny.Modelfile: already exists"),
        ("no_suffix", "give --out a name ending in .gguf"),
        ("out_is_a_folder", "is a folder"),
        ("unfinished", "has not finished"),
        ("no_gguf_package", "pip install 'minigpt-cli[export]'"),
    ],
)
def test_bad_input_exits_2_in_one_line_and_leaves_nothing(
    case: str,
    expected: str,
    tiny_pretrain_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = _copy_run(tiny_pretrain_run, tmp_path / "run")
    out = tmp_path / "exports" / "tiny.gguf"
    args = ["--format", "gguf"]
    if case == "unknown_dtype":
        args += ["--dtype", "q4_k"]
    elif case == "dtype_with_hf":
        args = ["--format", "hf", "--dtype", "f16"]
    elif case == "out_exists":
        out.parent.mkdir()
        out.write_text("keep me")
    elif case == "modelfile_exists":
        out.parent.mkdir()
        out.with_suffix(".Modelfile").write_text("keep me")
    elif case == "no_suffix":
        out = out.with_suffix("")
    elif case == "out_is_a_folder":
        out.mkdir(parents=True)
        args.append("--overwrite")
    elif case == "unfinished":
        _unfinished(run)
    elif case == "no_gguf_package":
        monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, stdout, stderr = _run_main(monkeypatch, capsys, "export", run, *args, "--out", out)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_both_files_and_a_failed_write_leaves_the_old_ones(
    pretrain_gguf: dict[str, Path],
    tiny_pretrain_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "tiny.gguf"
    out.write_text("an old export")
    out.with_suffix(".Modelfile").write_text("FROM ./old.gguf\n")
    # A disk that fills while the tensors are written: exit 3, the old pair untouched.
    monkeypatch.setenv("MINIGPT_FAULT", "ENOSPC@4")
    code, _, stderr = _run_main(
        monkeypatch, capsys, "export", tiny_pretrain_run, "-f", "gguf", "--out", out, "--overwrite"
    )
    monkeypatch.delenv("MINIGPT_FAULT")
    assert code == 3 and "no space left" in stderr and len(stderr.strip().splitlines()) == 1
    assert out.read_text() == "an old export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.Modelfile", "tiny.gguf"]
    code, stdout, _ = _run_main(
        monkeypatch, capsys, "export", tiny_pretrain_run, "-f", "gguf", "--out", out, "--overwrite"
    )
    assert code == 0 and "tiny.Modelfile" in stdout
    assert out.read_bytes() == pretrain_gguf["f16"].read_bytes()
    assert "FROM ./tiny.gguf" in out.with_suffix(".Modelfile").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.Modelfile", "tiny.gguf"]


# ----------------------------------------------------------------------- llama.cpp itself


@pytest.fixture(scope="session")
def llama_cpp() -> Any:
    """llama-cpp-python from the environment or `tests/llama_cpp_build.py`'s cache, built into
    the cache the first time (minutes; MINIGPT_LLAMA_CPP_BUILD=0 only uses what is there).
    Skipped with the reason when it cannot be had (no compiler, no network); with
    MINIGPT_REQUIRE_LLAMA_CPP=1, as CI sets, that fails instead."""
    build = os.environ.get("MINIGPT_LLAMA_CPP_BUILD", "1") != "0"
    module, reason = llama_cpp_build.load(build_if_missing=build)
    if module is None:
        if os.environ.get("MINIGPT_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return module


def _llama(llama_cpp: Any, path: Path, context: int) -> Any:
    """The file loaded by llama.cpp, its key/value cache in f32 (llama.cpp's default, f16, rounds
    keys and values on its own account; the tests measure the file)."""
    f32 = 0  # GGML_TYPE_F32
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=context,
        n_batch=context,
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,
        type_k=f32,
        type_v=f32,
        verbose=False,
    )


def _llama_greedy(llm: Any, ids: list[int], new: int, stops: tuple[int, ...]) -> list[int]:
    """llama.cpp's own greedy sampler (temperature 0) continuing `ids`, up to a stop id."""
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token in stops or len(out) == new:
            break
        out.append(int(token))
    return out


def _llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module")
def random_run(tiny_pretrain_run: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedRun:
    """The tiny run with weights drawn at random (a 30-step model repeats one token, which proves
    little), exported at f32 and f16 beside it. The scale, N(0, 0.2), varies the continuation
    token by token while activations stay in a trained model's range; at N(0, 1) attention
    saturates and f16's rounding alone flips near-tied tokens."""
    run = tmp_path_factory.mktemp("gguf-random") / "run"
    shutil.copytree(tiny_pretrain_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    loaded = load_run(run)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    save_tensors(run / MODEL_FILE, loaded.model.export_state_dict(), {"format": "minigpt"})
    for dtype in ("f32", "f16"):
        export_run(run, "gguf", run.parent / f"random-{dtype}.gguf", dtype=dtype)
    return load_run(run)


def test_llama_cpp_computes_minigpts_logits_with_grouped_queries_and_an_untied_head(
    llama_cpp: Any, tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    """The other shapes a run can have: one key/value head for two query heads (the key rows are
    permuted per key/value head) and its own output head (written as `output`). f32 file:
    minigpt's logits to rounding."""
    from minigpt_cli.config.loader import dump_config, read_run_config
    from minigpt_cli.engine.model.gpt import GPT

    run = _copy_run(tiny_pretrain_run, tmp_path / "run")
    config = read_run_config(run)
    config.model.n_kv_head = 1
    config.model.tie_embeddings = False
    (run / "config.toml").write_text(dump_config(config))
    tokenizer = load_run(tiny_pretrain_run).tokenizer
    torch.manual_seed(1)
    model = GPT(config.model, tokenizer.vocab_size)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    save_tensors(run / MODEL_FILE, model.export_state_dict(), {"format": "minigpt"})
    export_run(run, "gguf", tmp_path / "gqa.gguf", dtype="f32")
    fields, tensors = _fields(tmp_path / "gqa.gguf")
    assert fields["llama.attention.head_count_kv"] == 1 and "output.weight" in tensors
    loaded = load_run(run)
    llm = _llama(llama_cpp, tmp_path / "gqa.gguf", 64)
    for prompt in PROMPTS:
        ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
        with torch.no_grad():
            expected = loaded.model(torch.tensor([ids]))[0].numpy()
        np.testing.assert_allclose(_llama_logits(llm, ids), expected, atol=1e-4, rtol=0)


def test_llama_cpp_tokenizes_as_minigpt(
    llama_cpp: Any, pretrain_gguf: dict[str, Path], tiny_pretrain_run: Path
) -> None:
    """llama.cpp's tokenizer (sentencepiece rebuilt from the file's pieces and scores) gives
    minigpt's ids on mixed text, digits, emoji, whitespace and the training documents, and
    decodes them back. One known difference is left out: a literal U+2581, which minigpt spells
    as bytes and llama.cpp reads as its space sign."""
    from minigpt_cli.datasets import builtin

    ours = load_run(tiny_pretrain_run).tokenizer
    llm = _llama(llama_cpp, pretrain_gguf["f16"], 64)
    documents = [record["text"] for record in builtin.pretrain_records(40, seed=3)]
    for text in [*TEXTS, *documents]:
        if "\u2581" in text or not text:
            continue
        ids = ours.encode(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids).decode("utf-8") == text
    for piece, token_id in ours.special_tokens.items():  # typed text stays text...
        assert llm.tokenize(piece.encode(), add_bos=False, special=False) == ours.encode(piece)
        # ...and a template's marker is the special id
        assert llm.tokenize(piece.encode(), add_bos=False, special=True) == [token_id]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_greedy_equals_minigpt(dtype: str, llama_cpp: Any, random_run: LoadedRun) -> None:
    """On English and Chinese prompts, tokenised by llama.cpp itself (BOS included): the same
    prompt ids as `minigpt generate`, and llama.cpp's greedy continuation equals minigpt's."""
    tokenizer = random_run.tokenizer
    path = random_run.run_dir.parent / f"random-{dtype}.gguf"
    llm = _llama(llama_cpp, path, 64)
    stops = (tokenizer.eos_id, tokenizer.eot_id)
    seen: set[int] = set()
    for prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        assert ids == [tokenizer.eos_id, *tokenizer.encode(prompt)], prompt
        expected = _greedy(random_run, ids, 24)
        assert _llama_greedy(llm, ids, 24, stops) == expected, prompt
        seen.update(expected)
    assert len(seen) > 8  # real continuations, not one repeated token


# The largest |logit difference| from minigpt's fp32 logits, over every position of PROMPTS on the
# 30-step tiny run (logits' standard deviation about 1): measured 1.2e-6 (f32), 7.2e-4 (f16) and
# 0.031 (q8_0, which also rounds activations to 8 bits), bounded here with headroom.
LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "q8_0": 0.1}


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_cpp_logits_stay_within_the_stated_tolerance(
    dtype: str, llama_cpp: Any, pretrain_gguf: dict[str, Path], tiny_pretrain_run: Path
) -> None:
    """Every position's logits of every prompt, llama.cpp against minigpt's fp32 forward pass."""
    loaded = load_run(tiny_pretrain_run)
    llm = _llama(llama_cpp, pretrain_gguf[dtype], 64)
    worst = 0.0
    for prompt in PROMPTS:
        ids = [loaded.tokenizer.eos_id, *loaded.tokenizer.encode(prompt)]
        with torch.no_grad():
            expected = loaded.model(torch.tensor([ids]))[0].numpy()
        got = _llama_logits(llm, ids)
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= LOGIT_TOLERANCE[dtype], worst


def test_llama_cpp_chat_reply_equals_minigpt_generate_greedy(
    llama_cpp: Any, chat_gguf: Path, tiny_lora_sft_run: Path
) -> None:
    """llama.cpp applies the file's own chat template (through llama-cpp-python's chat
    completion) and replies greedily with the text `minigpt generate --greedy` prints, stopping
    at the end-of-turn token."""
    loaded = load_run(tiny_lora_sft_run)
    question = "What is 3 + 4?"
    llm = _llama(llama_cpp, chat_gguf, 64)
    # What the template renders, tokenised with the markers as specials: minigpt's prompt ids.
    rendered = loaded.tokenizer.decode(user_prompt(question, loaded.tokenizer), keep_special=True)
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == user_prompt(
        question, loaded.tokenizer
    )
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": question}],
        temperature=0.0,
        top_k=1,
        min_p=0.0,
        repeat_penalty=1.0,
        max_tokens=16,
    )
    printed = run_cli(
        "generate",
        tiny_lora_sft_run,
        "--greedy",
        "--prompt",
        question,
        "-n",
        "16",
        "--no-echo",
        "--threads",
        "1",
    )
    assert printed.returncode == 0, printed.stderr
    assert reply["choices"][0]["message"]["content"] + "\n" == printed.stdout
