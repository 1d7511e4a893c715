"""The configuration contract: presets, precedence, exact round trips, and every error message.

In-process tests call the loader directly; the exit-status tests run `python -m minigpt_cli` in a
subprocess because the UserError -> exit 2 conversion lives in `main()`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from minigpt_cli.cli.app import app
from minigpt_cli.config import PRESETS
from minigpt_cli.config.loader import dump_config, load_config, preset_summary, read_run_config
from minigpt_cli.config.schema import Config, memory_is_percent, parse_duration, parse_memory
from minigpt_cli.config.sources import load_preset, parse_set
from minigpt_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write(tmp_path: Path, text: str | bytes, name: str = "my.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(*args: object, **kwargs: object) -> str:
    with pytest.raises(UserError) as caught:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


def minigpt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minigpt_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or REPO,
        env={**os.environ, "COLUMNS": "200"},
    )


# ---------------------------------------------------------------------------------------------
# Presets


EXPECTED_SHAPES = {
    # name: (n_embd, n_layer, n_head, vocab, context, lr, global batch, max_steps)
    "tiny": (128, 4, 4, 5000, 128, 3e-3, 8, 300),
    "small": (512, 6, 8, 10000, 256, 1e-3, 32, 2000),
    "medium": (640, 10, 10, 16000, 512, 6e-4, 64, 5000),
    "large": (768, 12, 12, 32000, 512, 3e-4, 64, 10000),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_shapes_and_hyperparameters(name: str) -> None:
    cfg = load_config(name)
    n_embd, n_layer, n_head, vocab, context, lr, global_batch, steps = EXPECTED_SHAPES[name]
    assert (cfg.model.n_embd, cfg.model.n_layer, cfg.model.n_head) == (n_embd, n_layer, n_head)
    assert (cfg.tokenizer.vocab_size, cfg.model.context_length) == (vocab, context)
    train = cfg.stage_train("pretrain")
    assert train.learning_rate == lr
    assert train.min_lr == pytest.approx(lr / 10)
    assert train.micro_batch_size == 8
    assert train.global_batch_size == global_batch
    assert train.max_steps == steps
    assert 0.05 * steps <= train.warmup_steps <= 0.10 * steps
    assert train.eval_every <= steps and train.save_every <= steps


def test_learning_rate_falls_as_presets_grow() -> None:
    rates = [load_config(name).train.learning_rate for name in PRESETS]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates)


def test_presets_are_package_data_with_comments() -> None:
    import importlib.resources

    for name in PRESETS:
        text = (
            importlib.resources.files("minigpt_cli.config") / "presets" / f"{name}.toml"
        ).read_text()
        assert text.lstrip().startswith("#"), f"{name}.toml should open with a comment"
        assert load_preset(name)["model"]["n_embd"] == EXPECTED_SHAPES[name][0]


def test_preset_parameter_counts_come_from_params() -> None:
    params = pytest.importorskip("minigpt_cli.config.params")
    counts = {name: preset_summary(name)["parameters"] for name in PRESETS}
    for name in PRESETS:
        cfg = load_config(name)
        assert counts[name] == params.count_parameters(cfg.model, cfg.tokenizer.vocab_size)
    assert counts["tiny"] < counts["small"] < counts["medium"] < counts["large"]
    assert 10e6 <= counts["medium"] < 100e6
    assert 80e6 <= counts["large"] <= 150e6


def test_preset_summary_shape() -> None:
    summary = preset_summary("small")
    assert summary["n_layer"] == 6 and summary["n_embd"] == 512 and summary["n_head"] == 8
    assert summary["vocab_size"] == 10000 and summary["context_length"] == 256


def test_unknown_preset_suggests_the_close_one() -> None:
    message = error_of("tinny")
    assert message == (
        "unknown preset 'tinny' (choose from tiny, small, medium, large; did you mean 'tiny'?)"
    )
    assert "did you mean" not in error_of("xyz")


def test_no_preset_means_schema_defaults() -> None:
    assert load_config(None) == Config()


# ---------------------------------------------------------------------------------------------
# Precedence: preset < file < overrides (flags) < --set


def test_precedence_each_layer_beats_the_one_below(tmp_path: Path) -> None:
    file = write(tmp_path, "[train]\nmax_steps = 111\nseed = 5\n")
    assert load_config("small").train.max_steps == 2000
    assert load_config("small", file).train.max_steps == 111
    with_flag = load_config("small", file, {"train.max_steps": 222})
    assert with_flag.train.max_steps == 222
    with_set = load_config("small", file, {"train.max_steps": 222}, ["train.max_steps=333"])
    assert with_set.train.max_steps == 333
    # Keys no higher layer mentions keep the lower layer's value (merge is per key, not section).
    assert with_set.train.seed == 5
    assert with_set.train.learning_rate == 1e-3
    assert with_set.model.n_embd == 512


def test_later_set_beats_earlier_set_and_none_override_is_skipped() -> None:
    cfg = load_config(
        "tiny",
        overrides={"train.seed": None, "pretrain.max_steps": 7},
        sets=["train.seed=1", "train.seed=2"],
    )
    assert cfg.train.seed == 2
    assert cfg.pretrain.max_steps == 7
    assert cfg.stage_train("pretrain").max_steps == 7
    assert cfg.train.max_steps == load_config("tiny").train.max_steps


def test_stage_section_beats_train(tmp_path: Path) -> None:
    file = write(tmp_path, "[train]\nlearning_rate = 1e-3\n[pretrain]\nlearning_rate = 5e-4\n")
    cfg = load_config("tiny", file)
    assert cfg.stage_train("pretrain").learning_rate == 5e-4
    assert cfg.train.learning_rate == 1e-3


def test_set_values_are_read_as_toml() -> None:
    assert parse_set("train.learning_rate=3e-4") == ("train", "learning_rate", 3e-4)
    assert parse_set("train.compile=true") == ("train", "compile", True)
    assert parse_set('train.precision="bf16"') == ("train", "precision", "bf16")
    assert parse_set("train.precision=bf16") == ("train", "precision", "bf16")
    assert parse_set("a.b=[1, 2]") == ("a", "b", [1, 2])
    assert parse_set(" train.max_time = 10m ") == ("train", "max_time", "10m")
    assert parse_set("a.b=x=y") == ("a", "b", "x=y")
    # A newline cannot smuggle in extra TOML: the whole text stays one string.
    assert parse_set("a.b=1\n[model]") == ("a", "b", "1\n[model]")
    cfg = load_config("tiny", sets=["train.max_time=90", "resources.max_memory=1.5GB"])
    assert cfg.train.max_time == "90"  # a bare number for a duration string is kept as text
    assert cfg.resources.max_memory == "1.5GB"


@pytest.mark.parametrize("item", ["trainlr", "train=3", "a.b.c=1", ".x=1", "train.=1", "=1"])
def test_malformed_set_names_the_item(item: str) -> None:
    assert error_of("tiny", sets=[item]) == f"--set {item}: expected section.key=value"


# ---------------------------------------------------------------------------------------------
# dump_config round trips


def _round_trip(cfg: Config, tmp_path: Path) -> None:
    text = dump_config(cfg)
    path = write(tmp_path, text, "dump.toml")
    again = load_config(preset=None, config_file=path)
    assert again == cfg
    assert dump_config(again) == text


@pytest.mark.parametrize("name", PRESETS)
def test_dump_round_trips_every_preset(name: str, tmp_path: Path) -> None:
    _round_trip(load_config(name), tmp_path)


def test_dump_round_trips_overrides_and_awkward_floats(tmp_path: Path) -> None:
    cfg = load_config(
        "medium",
        overrides={"pretrain.max_steps": 17, "resources.max_memory": "6GiB"},
        sets=[
            "train.learning_rate=0.00030000000000000003",
            "train.min_lr=1e-300",
            "model.n_kv_head=5",
            "train.max_time=1.5h",
            "generate.temperature=0.1",
            "pretrain.precision=bf16",
        ],
    )
    _round_trip(cfg, tmp_path)
    assert cfg.train.learning_rate == 0.00030000000000000003


def test_dump_of_default_config_is_canonical(tmp_path: Path) -> None:
    _round_trip(Config(), tmp_path)
    assert dump_config(Config()) == dump_config(load_config(None))


@settings(max_examples=40, deadline=None)
@given(
    lr=st.floats(min_value=1e-12, max_value=0.999, allow_nan=False),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    temperature=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
)
def test_float_values_survive_dump_exactly(lr: float, fraction: float, temperature: float) -> None:
    cfg = load_config(
        None,
        overrides={
            "train.learning_rate": lr,
            "train.min_lr": lr * fraction,
            "generate.temperature": temperature,
        },
    )
    text = dump_config(cfg)
    import tomllib

    reloaded = Config.model_validate(tomllib.loads(text))
    assert reloaded.train.learning_rate == lr
    assert reloaded.train.min_lr == lr * fraction
    assert reloaded.generate.temperature == temperature


def test_dump_lists_every_key_and_omits_none() -> None:
    import tomllib

    cfg = load_config("tiny")
    text = dump_config(cfg)
    assert text.startswith("#")
    tables = tomllib.loads(text)
    assert list(tables) == list(Config.model_fields)  # every section, in schema order
    for section, table in cfg.model_dump().items():
        assert f"\n[{section}]\n" in text
        assert tables[section] == {k: v for k, v in table.items() if v is not None}
    assert "n_kv_head" not in tables["model"] and tables["pretrain"] == {}


def test_config_file_bom_and_crlf_are_tolerated(tmp_path: Path) -> None:
    path = write(tmp_path, b"\xef\xbb\xbf[train]\r\nmax_steps = 5\r\n")
    assert load_config("tiny", path).train.max_steps == 5


def test_number_for_a_duration_string_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nmax_time = 600\n")
    assert load_config("tiny", path).train.max_time == "600"


# ---------------------------------------------------------------------------------------------
# Error messages


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[train]\nlearning_rat = 1\n",
            "my.toml:2: unknown key 'learning_rat' in [train] (did you mean 'learning_rate'?)",
        ),
        ("[trian]\nseed = 1\n", "my.toml:1: unknown section [trian] (did you mean [train]?)"),
        (
            "[model]\nvocab_size = 100\n",
            "my.toml:2: unknown key 'vocab_size' in [model] (it belongs in [tokenizer])",
        ),
        (
            "seed = 3\n",
            "my.toml:1: key 'seed' must be inside a section (it belongs in [train], "
            "or a stage section such as [pretrain] for one stage)",
        ),
        ("train = 3\n", "my.toml:1: 'train' must be a table ([train]), got 3"),
        (
            "[train]\nlearning_rate = -1\n",
            "my.toml:2: [train] learning_rate = -1: must be greater than 0",
        ),
        (
            "[train]\nprecision = 'fp8'\n",
            "my.toml:2: [train] precision = 'fp8': must be one of auto, fp32, bf16, fp16",
        ),
        ("[train]\nmax_steps = true\n", "my.toml:2: [train] max_steps = true: must be an integer"),
        ("[train]\nmax_steps = 1.5\n", "my.toml:2: [train] max_steps = 1.5: must be an integer"),
        ("[train]\ncompile = 'yes'\n", "my.toml:2: [train] compile = 'yes': must be true or false"),
        ("[train]\nlearning_rate = '1e-3'\n", "[train] learning_rate = '1e-3': must be a number"),
        ("[tokenizer]\nvocab_size = 100\n", "[tokenizer] vocab_size = 100: must be at least 320"),
        ("[train]\nbeta2 = 1.0\n", "[train] beta2 = 1.0: must be less than 1"),
        (
            "[train]\nmax_time = 'soon'\n",
            "[train] max_time = 'soon': 'soon' is not a duration (use seconds, or e.g. 90s, 10m",
        ),
        (
            "[resources]\nmax_memory = '12XB'\n",
            "[resources] max_memory = '12XB': '12XB' is not a memory size",
        ),
        ("[resources]\nmax_memory = [1]\n", "max_memory = [1]: must be a number or a string"),
        ("[resources]\nmax_memory = 150\n", "memory percent must be in (0, 100]"),
        ("[log]\nprogress = 'fancy'\n", "must be one of auto, rich, plain, none"),
        # Cross-field rules name the section (and the file's line of it).
        (
            "[model]\nn_embd = 100\nn_head = 3\n",
            "my.toml:1: [model] n_embd (100) must be divisible by n_head (3)",
        ),
        ("[model]\nn_embd = 96\nn_head = 32\n", "[model] head size n_embd/n_head = 3 must be even"),
        (
            "[model]\nn_head = 8\nn_embd = 512\nn_kv_head = 3\n",
            "[model] n_head (8) must be divisible by n_kv_head (3)",
        ),
        (
            "\n[train]\nglobal_batch_size = 30\n",
            "my.toml:2: [train] global_batch_size (30) must be a multiple of micro_batch_size (8)",
        ),
        # A stage section that is fine alone but not laid over [train].
        (
            "[pretrain]\nmicro_batch_size = 5\n",
            "my.toml:1: [pretrain] global_batch_size (8) must be a multiple of micro_batch_size",
        ),
    ],
)
def test_file_error_messages(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    message = error_of("tiny", path)
    assert expected in message
    assert str(path) in message.splitlines()[0]


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nlearning_rat = 1\nlearning_rate = -1\n[trian]\n")
    lines = error_of("tiny", path).splitlines()
    assert len(lines) == 3
    assert any("unknown key 'learning_rat'" in line for line in lines)
    assert any("unknown section [trian]" in line for line in lines)
    assert any("learning_rate = -1: must be greater than 0" in line for line in lines)


def test_problem_list_is_capped(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\n" + "".join(f"bogus{i} = 1\n" for i in range(30)))
    lines = error_of("tiny", path).splitlines()
    assert len(lines) == 21
    assert lines[-1] == "... and 10 more problems"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[train]\nlearning_rate = \n", "my.toml:2:17: Invalid value"),
        ("[model]\nn_layer = 4\n[model]\n", "my.toml:3:"),
        ("[train\n", "my.toml:1:7: "),
        ("a = [1,\n", "my.toml:2:1: "),
    ],
)
def test_toml_syntax_error_names_line_and_column(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of("tiny", write(tmp_path, text))
    assert message.startswith(str(tmp_path / expected))
    assert "(at line" not in message


def test_missing_directory_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert error_of("tiny", missing) == f"{missing}: no such config file"
    assert error_of("tiny", tmp_path) == f"{tmp_path}: is a directory, not a TOML config file"
    bad = write(tmp_path, b"[train]\n# caf\xe9\n")
    assert error_of("tiny", bad).startswith(f"{bad}:2:6: not valid UTF-8 (byte 0xe9)")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\n")
    path.chmod(0)
    try:
        assert error_of("tiny", path) == f"{path}: cannot read config file (permission denied)"
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            "train.learning_rat=1",
            "--set train.learning_rat=1: unknown key 'learning_rat' in [train] "
            "(did you mean 'learning_rate'?)",
        ),
        ("trian.seed=1", "--set trian.seed=1: unknown section [trian] (did you mean [train]?)"),
        ("train.learning_rate=abc", "--set train.learning_rate=abc: must be a number"),
        ("train.learning_rate=-1", "--set train.learning_rate=-1: must be greater than 0"),
        (
            "train.precision=fp8",
            "--set train.precision=fp8: must be one of auto, fp32, bf16, fp16",
        ),
        (
            "model.n_head=3",
            "--set model.n_head=3: [model] n_embd (128) must be divisible by n_head (3)",
        ),
        (
            "pretrain.global_batch_size=12",
            "--set pretrain.global_batch_size=12: [pretrain] global_batch_size (12) must be a "
            "multiple of micro_batch_size (8)",
        ),
    ],
)
def test_set_error_messages(item: str, expected: str) -> None:
    assert error_of("tiny", sets=[item]).startswith(expected)


def test_override_errors_name_the_key() -> None:
    assert error_of("tiny", overrides={"pretrain.max_steps": 0}) == (
        "pretrain.max_steps = 0: must be at least 1"
    )
    assert "unknown key 'max_stepz'" in error_of("tiny", overrides={"train.max_stepz": 1})


def test_error_names_the_layer_that_set_the_value(tmp_path: Path) -> None:
    # The file sets n_head = 3, the --set makes the division fail: blame the last writer.
    path = write(tmp_path, "[model]\nn_head = 4\n")
    message = error_of("tiny", path, sets=["model.n_embd=100"])
    assert message.startswith("--set model.n_embd=100: [model]")


# ---------------------------------------------------------------------------------------------
# read_run_config


def test_read_run_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert error_of_run(run) == f"{run} is not a run directory (no config.toml)"
    run.mkdir()
    assert error_of_run(run) == f"{run} is not a run directory (no config.toml)"
    cfg = load_config("small", sets=["train.seed=9"])
    (run / "config.toml").write_text(dump_config(cfg), encoding="utf-8")
    assert read_run_config(run) == cfg
    (run / "config.toml").write_text("[train]\nseed = -1\n", encoding="utf-8")
    assert error_of_run(run) == f"{run / 'config.toml'}:2: [train] seed = -1: must be at least 0"


def error_of_run(run: Path) -> str:
    with pytest.raises(UserError) as caught:
        read_run_config(run)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------
# parse_duration / parse_memory


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("1.5h", 5400), (" 5 m ", 300), (30, 30)],
)
def test_parse_duration(value: str | int, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["0", "0s", 0, -5, "", "10 min", "1h30m", "-5m", "abc", True])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)  # type: ignore[arg-type]


GIB = 2**30


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (70, int(16 * GIB * 0.7)),
        ("70", int(16 * GIB * 0.7)),
        ("70%", int(16 * GIB * 0.7)),
        (12.5, 2 * GIB),
        ("100", 16 * GIB),
        ("1.5GB", 1_500_000_000),
        ("1.5 gb", 1_500_000_000),
        ("6GiB", 6 * GIB),
        ("512MB", 512_000_000),
        ("512mib", 512 * 2**20),
    ],
)
def test_parse_memory(value: str | float, expected: int) -> None:
    assert parse_memory(value, 16 * GIB) == expected


@pytest.mark.parametrize(
    "value", ["0", "0%", "100.5", "101", "-5", "0GB", "1.5XB", "", "GB", "1e3"]
)
def test_parse_memory_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_memory(value, 16 * GIB)


def test_a_memory_cap_is_a_percent_exactly_when_parse_memory_reads_it_as_one() -> None:
    """The device-memory cap treats a share of RAM differently from a size (`cap_device_memory`)."""
    for value in (70, "70", "70%", " 12.5 % "):
        assert memory_is_percent(value)
        assert parse_memory(value, 1000) == int(1000 * float(str(value).strip(" %")) / 100)
    for value in ("1.5GB", "6GiB", "512mb", "x"):
        assert not memory_is_percent(value)


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.parametrize("name", PRESETS)
def test_cli_show_round_trips(name: str, tmp_path: Path) -> None:
    first = runner.invoke(app, ["config", "show", "--preset", name, "--set", "train.seed=3"])
    assert first.exit_code == 0, first.output
    path = write(tmp_path, first.stdout, "shown.toml")
    # No --preset: the default (tiny) lies under the file, which lists every key, so it is moot.
    second = runner.invoke(app, ["config", "show", "--config", str(path)])
    assert second.exit_code == 0, second.output
    assert second.stdout == first.stdout
    assert load_config(None, path) == load_config(name, sets=["train.seed=3"])


def test_cli_presets_lists_shapes() -> None:
    result = runner.invoke(app, ["config", "presets"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:6] == ["preset", "layers", "d_model", "heads", "vocab", "context"]
    for line, name in zip(lines[1:], PRESETS, strict=True):
        n_embd, n_layer, n_head, vocab, context = EXPECTED_SHAPES[name][:5]
        cells = line.split()
        assert cells[:6] == [name, str(n_layer), str(n_embd), str(n_head), str(vocab), str(context)]
        count = preset_summary(name)["parameters"]
        if count is not None:
            assert f"{count:,}" in line


def test_cli_validate_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nmax_steps = 50\n", "good.toml")
    result = runner.invoke(app, ["config", "validate", str(path), "--preset", "small"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: ok"
    assert "6 layers" in lines[1] and "d_model 512" in lines[1] and "50 steps" in lines[1]


@pytest.mark.parametrize(
    "example", sorted((REPO / "examples").glob("*.toml")), ids=lambda p: p.name
)
def test_example_configs_validate(example: Path) -> None:
    result = runner.invoke(app, ["config", "validate", str(example)])
    assert result.exit_code == 0, result.output
    text = example.read_text(encoding="utf-8")
    assert text.lstrip().startswith("#"), "example configs explain themselves"


def test_cli_validate_bad_file_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nlearning_rat = 1\n", "tiny.toml")
    result = minigpt("config", "validate", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {path}:2: unknown key 'learning_rat' in [train] (did you mean 'learning_rate'?)\n"
    )


def test_cli_syntax_error_and_bad_set_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nmax_steps = = 3\n", "bad.toml")
    result = minigpt("config", "show", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {path}:2:13: ")
    assert "Traceback" not in result.stderr
    result = minigpt("config", "show", "--set", "train.learning_rate=0", "--preset", "tinny")
    assert result.returncode == 2
    assert "unknown preset 'tinny'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_show_round_trips_through_the_real_command(tmp_path: Path) -> None:
    first = minigpt("config", "show", "--preset", "large", "--set", "train.precision=bf16")
    assert first.returncode == 0, first.stderr
    path = write(tmp_path, first.stdout, "large.toml")
    second = minigpt("config", "show", "--config", str(path))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert 'precision = "bf16"' in first.stdout


def test_config_help_imports_no_heavy_modules() -> None:
    code = textwrap.dedent(
        """
        import sys
        import minigpt_cli.config
        assert "pydantic" not in sys.modules, "minigpt_cli.config must import lazily"
        assert minigpt_cli.config.PRESETS == ("tiny", "small", "medium", "large")
        import minigpt_cli.cli.app
        from typer.testing import CliRunner
        runner = CliRunner()
        for args in (["config", "--help"], ["config", "show", "--help"], ["config", "show"]):
            result = runner.invoke(minigpt_cli.cli.app.app, args)
            assert result.exit_code == 0, result.output
            heavy = [m for m in ("torch", "numpy", "sentencepiece") if m in sys.modules]
            assert not heavy, (args, heavy)
        print("clean")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


@pytest.mark.parametrize(
    ("sets", "algorithm", "per_step", "micro", "passes"),
    [
        # A learned reward: PPO, one response per prompt, the rollout of 16 in one step, 2 passes.
        ([], "ppo", 16, 16, 2),
        # The rule reward: GRPO, 16 groups of 8 in one step (8 micro-batches of 16), 1 pass.
        (["rlhf.reward=rule"], "grpo", 128, 16, 1),
        # The reward model and the rule together (the quickstart's RLHF): GRPO as well.
        (["rlhf.reward=both"], "grpo", 128, 16, 1),
        # What the user names wins: the algorithm, the step size and the passes.
        (["rlhf.reward=rule", "rlhf.algo=ppo"], "ppo", 16, 16, 2),
        (["rlhf.algo=grpo", "rlhf.global_batch_size=32", "rlhf.ppo_epochs=3"], "grpo", 32, 16, 3),
        # A rollout the micro-batch does not divide is cut into the largest micro-batch that does.
        (
            ["rlhf.algo=grpo", "rlhf.rollout_batch_size=6", "rlhf.num_generations=3"],
            "grpo",
            18,
            9,
            1,
        ),
    ],
)
def test_rl_defaults_follow_the_reward_and_take_one_step_per_rollout(
    sets: list[str], algorithm: str, per_step: int, micro: int, passes: int
) -> None:
    config = load_config("tiny", sets=sets)
    train = config.stage_train("rlhf")
    assert config.rlhf.algorithm == algorithm
    assert (train.global_batch_size, train.micro_batch_size) == (per_step, micro)
    assert config.rlhf.passes() == passes
