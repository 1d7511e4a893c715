"""The installed command as a whole: start-up imports, version, completion, the one error path."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt_cli import __version__
from minigpt_cli.cli import common
from tests.conftest import run_cli


def test_importing_the_cli_pulls_in_no_heavy_library() -> None:
    code = (
        "import sys, minigpt_cli.cli.app\n"
        "heavy = ('torch', 'numpy', 'sentencepiece', 'rich', 'pydantic', 'safetensors', 'fastapi',"
        " 'uvicorn', 'starlette')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


_SHOW_MKL_SETTING = """
import os, sys
from minigpt_cli.cli.app import app
users = os.environ.get("MKL_CBWR")
for verb in sys.argv[1:]:
    os.environ.pop("MKL_CBWR", None) if users is None else os.environ.update(MKL_CBWR=users)
    app([verb, "--help"], standalone_mode=False)
    print("setting:", verb, os.environ.get("MKL_CBWR"), "torch" in sys.modules)
"""


def test_training_verbs_ask_mkl_for_sums_split_the_same_way_every_run() -> None:
    """Before torch is imported, a training verb sets MKL's strict reproducibility mode (a user's
    own setting kept); the decoding verbs leave MKL's faster one-row products alone. Without it,
    fp32 training of `tiny` with 2 threads ended on other weights in about one run of ten (6 of 53
    six-step runs); with it, 30 of 30 agreed bit for bit (measured, not asserted here: a test
    would catch a regression only one run in ten)."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    verbs = ["quickstart", "pretrain", "sft", "dpo", "rlhf", "generate", "eval", "chat", "serve"]
    for users in (None, "COMPATIBLE"):
        run_env = env if users is None else {**env, "MKL_CBWR": users}
        shown = subprocess.run(
            [sys.executable, "-c", _SHOW_MKL_SETTING, *verbs],
            env=run_env,
            capture_output=True,
            text=True,
        )
        settings = [line for line in shown.stdout.splitlines() if line.startswith("setting:")]
        training = users or "AUTO,STRICT"
        want = [f"setting: {v} {training if i < 5 else users} False" for i, v in enumerate(verbs)]
        assert settings == want, shown.stderr


def test_version_and_help_list_the_verbs() -> None:
    assert run_cli("--version").stdout.strip() == f"minigpt {__version__}"
    help_text = run_cli("--help").stdout
    for verb in (
        "doctor",
        "pretrain",
        "sft",
        "dpo",
        "rlhf",
        "generate",
        "eval",
        "chat",
        "quickstart",
        "config",
        "data",
        "tokenize",
        "export",
        "serve",
    ):
        assert f"\n  {verb} " in help_text


def test_console_script_is_installed() -> None:
    script = shutil.which("minigpt", path=str(Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == f"minigpt {__version__}"


def test_shell_completion_script_and_completions() -> None:
    # The script as click's completion variable asks for it: `--show-completion` finds the shell
    # by walking up the process tree (shellingham), which fails in a job detached from its shell
    # (a background job, some CI runners) whatever $SHELL says.
    script = run_cli(env={"_MINIGPT_COMPLETE": "source_bash"})
    assert script.returncode == 0
    assert "_minigpt_completion" in script.stdout and "complete " in script.stdout
    completed = subprocess.run(
        [sys.executable, "-m", "minigpt_cli"],
        env={
            **os.environ,
            "_MINIGPT_COMPLETE": "complete_bash",
            "COMP_WORDS": "minigpt pre",
            "COMP_CWORD": "1",
        },
        capture_output=True,
        text=True,
    )
    assert completed.stdout.split() == ["pretrain"]


def test_user_errors_exit_2_in_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    result = run_cli("pretrain", "--data", missing, "--out", tmp_path / "run")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and lines[0].startswith("error: ")
    debug = run_cli("--debug", "pretrain", "--data", missing, "--out", tmp_path / "run")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_flag_errors_are_usage_errors_with_status_2() -> None:
    result = run_cli("pretrain", "--max-steps", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--max-steps" in result.stderr


def test_contradictory_flags_are_refused(tmp_path: Path) -> None:
    result = run_cli("pretrain", "--resume", "--overwrite", "--out", tmp_path / "x")
    assert result.returncode == 2
    assert "contradict" in result.stderr


def test_pickle_given_as_a_checkpoint_is_refused_and_never_run(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "planted"
    shutil.copytree(tiny_pretrain_run, run_dir)
    payload = (
        "import pickle, pathlib\n"
        "class P:\n"
        "    def __reduce__(self):\n"
        f"        return (pathlib.Path.touch, (pathlib.Path({str(marker)!r}),))\n"
        f"pathlib.Path({str(run_dir / 'model.safetensors')!r}).write_bytes(pickle.dumps(P()))\n"
    )
    os.unlink(run_dir / "model.safetensors")
    subprocess.run([sys.executable, "-c", payload], check=True)
    result = run_cli("generate", run_dir, "--prompt", "hello", "--max-new-tokens", "3")
    assert result.returncode == 2
    assert "never unpickles" in result.stderr
    assert not marker.exists()


def test_a_training_verb_gets_the_shared_flags_once_and_their_defaults_from_python() -> None:
    """`training_verb` declares the shared flags for every training verb: Typer sees them in the
    signature, a verb that omits one does not take it, and a Python caller gets the defaults."""
    received: list[tuple[common.TrainingFlags, int | None]] = []

    @common.training_verb(omit=("epochs",), first=("beta",))
    def verb(flags: common.TrainingFlags, beta: int | None = None) -> None:
        received.append((flags, beta))

    names = list(inspect.signature(verb).parameters)
    assert names[:2] == ["beta", "preset"] and names[-1] == "sets"
    assert "max_steps" in names and "epochs" not in names
    verb(max_steps=7, resume=True, beta=3)
    flags, beta = received[0]
    assert beta == 3 and flags.resume and not flags.overwrite and flags.preset is None
    assert flags.overrides("dpo", beta=beta) == {"dpo.max_steps": 7, "dpo.beta": 3}
    with pytest.raises(TypeError):
        verb(epochs=2)  # an omitted flag is not accepted


def test_rlhf_takes_no_flag_it_cannot_honour() -> None:
    result = run_cli("rlhf", "--max-tokens", "5")
    assert result.returncode == 2 and "--max-tokens" in result.stderr
