"""`minigpt eval RUN [RUN ...]`: several runs measured on the same held-out data, one table.

The measuring is `engine.evaluate.run.run_eval`; this module parses flags, applies the CPU caps
of the first run's [resources], and renders the report (`print_report`, also used by
`quickstart`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from minigpt_cli.cli import common, decoding
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from minigpt_cli.engine.evaluate.report import EvalReport

# Metrics where a lower value is better (every other shown metric: higher is better).
LOWER_IS_BETTER = ("nll", "ppl", "bpb")
# Shown per task family in the table (every metric of every family is in --json).
FAMILY_METRICS = ("exact_match", "bleu", "rougeL", "pref_accuracy")
PREFERENCE_SECTION = "preference pairs"
SAMPLE_WIDTH = 150
SCORED_BY = {
    "parent_reward": "vs parent",
    "mean_logprob": "mean logp",
}  # characters of a prompt or answer shown before "..."

PathsOpt = list[Path] | None


def eval_runs(
    runs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN",
            help="Run directories to compare, e.g. runs/pretrain-tiny runs/sft-tiny.",
            show_default=False,
        ),
    ],
    text: Annotated[
        PathsOpt,
        typer.Option(
            "--text",
            metavar="PATH",
            help='Text for perplexity and bits per byte: .txt or {"text"} JSONL, file or '
            "folder, repeatable. Default: the built-in documents pretraining held out.",
        ),
    ] = None,
    sft_data: Annotated[
        PathsOpt,
        typer.Option(
            "--sft-data",
            metavar="PATH",
            help="Prompts with reference answers, in any format `minigpt sft` reads (repeatable). "
            "Default: the built-in held-out instructions.",
        ),
    ] = None,
    pref_data: Annotated[
        PathsOpt,
        typer.Option(
            "--pref-data",
            metavar="PATH",
            help='Preference pairs {"prompt","chosen","rejected"} (repeatable). '
            "Default: the built-in held-out pairs.",
        ),
    ] = None,
    per_family: Annotated[
        int,
        typer.Option(
            "--per-family",
            min=0,
            help="Prompts and pairs per task family (drawn with --seed); 0 = all.",
        ),
    ] = 50,
    samples: Annotated[
        int, typer.Option("--samples", min=0, help="Answers shown per run (prompt, reference).")
    ] = 3,
    reward_model: Annotated[
        Path | None,
        typer.Option(
            "--reward-model",
            help="A reward run (e.g. runs/rlhf-ppo-tiny/reward): its mean score of every run's "
            "answers is the `reward` row.",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            min=1,
            help="Tokens per answer at most. Default: the longest reference in the batch + 8, "
            "as SFT's own held-out check.",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Which records are drawn; same seed, same report.")
    ] = 0,
    device: Annotated[
        str, typer.Option("--device", help="auto | cpu | cuda | mps (auto: CUDA, MPS, then CPU).")
    ] = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON instead of the table.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", metavar="FILE", help="Also write the JSON report to FILE."),
    ] = None,
    no_text: Annotated[
        bool, typer.Option("--no-text", help="Skip perplexity and bits per byte.")
    ] = False,
    no_generation: Annotated[
        bool,
        typer.Option("--no-generation", help="Skip answers (exact match, BLEU, ROUGE)."),
    ] = False,
    no_pref: Annotated[bool, typer.Option("--no-pref", help="Skip preference accuracy.")] = False,
    quantize: decoding.QuantizeOpt = None,
    max_cpu: decoding.MaxCpuOpt = None,
    threads: decoding.ThreadsOpt = None,
) -> None:
    """Compare runs on held-out data: perplexity, bits per byte, exact match, BLEU, ROUGE and
    preference accuracy, per task family and overall, in one table.

    Every run answers in the chat template (base runs zero-shot), greedily. Example:
    minigpt eval runs/pretrain-tiny runs/sft-tiny runs/dpo-tiny --samples 2
    """
    from rich.console import Console

    from minigpt_cli.cli.render import EventRenderer
    from minigpt_cli.engine.core.io import atomic_write_text
    from minigpt_cli.engine.evaluate.report import PARTS, EvalOptions
    from minigpt_cli.engine.evaluate.run import check_run_dirs, run_eval
    from minigpt_cli.engine.model.quantize import check_quantization

    check_quantization(quantize)
    check_run_dirs(runs)
    if output is not None:
        common.check_output(output.parent)  # before minutes of evaluation, not after
    skipped = {"text": no_text, "generation": no_generation, "preference": no_pref}
    parts = tuple(part for part in PARTS if not skipped[part])
    if not parts:
        raise UserError("--no-text, --no-generation and --no-pref leave nothing to evaluate")
    options = EvalOptions(
        text=tuple(text or ()),
        sft_data=tuple(sft_data or ()),
        pref_data=tuple(pref_data or ()),
        per_family=per_family or None,
        samples=samples,
        seed=seed,
        device=device,
        max_new_tokens=max_new_tokens,
        reward_model=reward_model,
        parts=parts,
        quantize=quantize,
    )
    _apply_caps(runs, device, max_cpu, threads)
    # Progress goes to stderr, so stdout holds only the report (pipe --json into a file).
    with EventRenderer(console=Console(stderr=True, highlight=False)) as renderer:
        report = run_eval(runs, options, renderer)
    document = json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
    if output is not None:
        atomic_write_text(output, document)
    if as_json:
        typer.echo(document, nl=False)
    else:
        print_report(report, Console(highlight=False))


def _apply_caps(runs: list[Path], device: str, max_cpu: float | None, threads: int | None) -> None:
    """The first run's [resources] caps, with `--max-cpu` / `--threads` over them, for this
    process, as the training verbs apply them: niceness, torch threads (the cores left idle,
    within `max_cpu`, or `threads`) and the duty cycle for a fractional cap. Not `generate`'s
    single decoding thread: most of eval is batched forward passes (text windows, preference
    pairs, 32 prompts at a time), which use more cores.
    """
    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.engine.hardware.device import resolve_device
    from minigpt_cli.engine.resources.governor import apply_resources

    resources = decoding.resources_with_flags(read_run_config(runs[0]).resources, max_cpu, threads)
    if resolve_device(device).type == "cpu":
        apply_resources(resources)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _format(key: str, value: float) -> str:
    base = key.split("/", 1)[0]
    if base == "bleu":
        return f"{value:.2f}"
    if base == "ppl":
        return f"{value:,.2f}"
    if base == "pref_margin":
        return f"{value:+.3f}"
    return f"{value:.3f}"


def _best(key: str, values: list[float | None]) -> float | None:
    """The best value of a row, or None when there is nothing to compare."""
    known = [v for v in values if v is not None]
    if len(known) < 2 or len(set(known)) < 2 or key.startswith("pref_margin"):
        return None  # margins mix rewards and mean log-probs: not comparable across runs
    return min(known) if key.split("/", 1)[0] in LOWER_IS_BETTER else max(known)


def _rows(report: EvalReport) -> list[tuple[str, list[str]]]:
    """(section title, metric keys) in display order, only keys some run has."""
    present = {key for run in report.runs for key in run.metrics}
    families = sorted({key.split("/", 1)[1] for key in present if "/" in key})
    sections: list[tuple[str, list[str]]] = [
        ("held-out text", ["ppl", "bpb"]),
        ("answers", ["exact_match", "bleu", "rouge1", "rouge2", "rougeL", "reward"]),
        (PREFERENCE_SECTION, ["pref_accuracy", "pref_margin"]),
    ]
    for family in families:
        sections.append((family, [f"{metric}/{family}" for metric in FAMILY_METRICS]))
    return [(title, [k for k in keys if k in present]) for title, keys in sections]


def _one_line(text: str, width: int = SAMPLE_WIDTH) -> str:
    flat = text.replace("\r\n", "\n").replace("\n", " ⏎ ")
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def print_report(report: EvalReport, console: Console) -> None:
    """The comparison table (rows = metrics, columns = runs, best of each row in bold), what the
    numbers were measured on, and a few answers per run."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="minigpt eval", title_justify="left", show_lines=False)
    table.add_column("metric", no_wrap=True)
    for run in report.runs:
        header = Text(run.name, style="bold")
        stage = "" if run.stage == run.name else run.stage or "?"
        subtitle = " ".join(part for part in (stage, "(chat)" if run.chat else "") if part)
        header.append(f"\n{subtitle}", style="dim")
        table.add_column(header, justify="right")
    for title, keys in _rows(report):
        if not keys:
            continue
        table.add_section()
        table.add_row(Text(title, style="bold cyan"), *["" for _ in report.runs])
        for key in keys:
            values = [run.metrics.get(key) for run in report.runs]
            best = _best(key, values)
            cells: list[Any] = []
            for value in values:
                if value is None:
                    cells.append(Text("-", style="dim"))
                else:
                    style = "bold green" if best is not None and value == best else ""
                    cells.append(Text(_format(key, value), style=style))
            label = key.split("/", 1)[0] if "/" in key else key
            table.add_row(Text(f"  {label}"), *cells)
        if title == PREFERENCE_SECTION:
            table.add_row(
                Text("  scored by", style="dim"),
                *[
                    Text(SCORED_BY.get(run.pref_score or "", "-"), style="dim")
                    for run in report.runs
                ],
            )
    console.print(table)
    for part, line in report.data.items():
        console.print(Text(f"{part}: {line}", style="dim"))
    console.print(
        Text(
            "ppl, bpb: lower is better. exact_match, rouge, pref_accuracy: 0-1; bleu: 0-100 "
            "(sacrebleu). pref_margin: mean chosen - rejected score, scored by log p(run) - "
            "log p(parent) (vs parent) or per-token mean log p (mean logp, runs without a parent).",
            style="dim",
        )
    )
    for run in report.runs:
        if not run.samples:
            continue
        console.print(Text(f"\nsamples: {run.name}", style="bold"))
        for sample in run.samples:
            family = f"[{sample['family']}] " if sample["family"] else ""
            console.print(Text(f"  {family}prompt: {_one_line(sample['prompt'])}"))
            console.print(Text(f"    reference: {_one_line(sample['reference'])}", style="dim"))
            console.print(Text(f"    answer:    {_one_line(sample['answer'])}"))


def register(app: typer.Typer) -> None:
    """Add `minigpt eval`."""
    app.command("eval")(eval_runs)
