"""`minigpt doctor`: what this machine can do, readable at a glance, or as JSON for a bug report.

Besides the checks and facts it recommends a preset: the largest whose default pretraining run
fits `--max-memory` / `--max-cpu` and finishes within `--budget`, from the governor's own memory
plan and a measured training step (`engine.doctor.recommend.recommend_preset`).

Exit status: 0 when every check passes or only warns, 1 when a check fails (too old Python or
torch, an unwritable runs directory, a matmul giving wrong answers), 2 for a bad flag value.
Lacking a GPU is never a failure, and neither is a recommendation of none. torch and rich are
imported inside the command so `minigpt --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from minigpt_cli.errors import UserError

_SYMBOLS = {"pass": "✓", "warn": "!", "fail": "✗"}
_ASCII_SYMBOLS = {"pass": "+", "warn": "!", "fail": "x"}
_STYLES = {"pass": "green", "warn": "yellow", "fail": "bold red"}
_FEATURE_LABELS = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_bf16", "AVX512-BF16"),
    ("amx_bf16", "AMX"),
)


def _cpu_row(cpu: dict[str, Any], machine: str) -> str:
    features = cpu["features"]
    if cpu.get("flags_source") is None:
        flags = "CPU features unknown"
    elif machine.lower() in ("arm64", "aarch64") or features.get("arm_bf16"):
        flags = "BF16" if features.get("arm_bf16") else "no BF16"
    else:
        present = [label for key, label in _FEATURE_LABELS if features.get(key)]
        absent = [label for key, label in _FEATURE_LABELS if not features.get(key)]
        if not present:
            flags = f"no {', '.join(absent)}"
        else:
            flags = ", ".join(present) + (f" (no {', '.join(absent)})" if absent else "")
    return f"{cpu['model']} · {flags} · torch kernels {cpu['capability']}"


def _cores_row(cpu: dict[str, Any]) -> str:
    text = f"{cpu['physical_cores'] or '?'} physical, {cpu['logical_cores']} logical"
    if cpu.get("usable_cores") and cpu["usable_cores"] != cpu["logical_cores"]:
        text += f" ({cpu['usable_cores']} usable)"
    text += f" · torch threads {cpu['torch_threads']}"
    if cpu.get("load_average") is not None:
        text += f" · load {cpu['load_average']:.1f}"
    return text


def _torch_row(build: dict[str, Any]) -> str:
    if build.get("cuda"):
        kind = f"CUDA {build['cuda']}"
    elif build.get("hip"):
        kind = f"ROCm {build['hip']}"
    else:
        kind = "CPU build"
    parts = [build["version"], kind]
    if build.get("blas"):
        parts.append(f"BLAS {build['blas']}")
    parts.append("oneDNN" if build.get("mkldnn") else "no oneDNN")
    return " · ".join(parts)


def _accelerator_rows(accelerators: dict[str, Any]) -> list[str]:
    from minigpt_cli.engine.core.units import format_bytes

    rows = []
    for device in accelerators["cuda"]["devices"]:
        memory = format_bytes(device["total_memory_bytes"])
        rows.append(
            f"cuda:{device['index']} {device['name']} · {memory} · "
            f"sm{device['compute_capability'].replace('.', '')} · "
            f"{'bf16' if device['bf16'] else 'no native bf16'}"
        )
    if accelerators["mps"]["available"]:
        rows.append("Apple MPS")
    return rows or ["none (CPU only)"]


def _matmul_row(measurements: dict[str, Any]) -> str:
    from minigpt_cli.engine.core.units import format_gflops, format_ratio
    from minigpt_cli.engine.hardware.matmul import MATMUL_LABELS

    speedups = measurements.get("speedup", {})
    parts = []
    for key, value in measurements.get("gflops", {}).items():
        text = f"{MATMUL_LABELS.get(key, key)} {format_gflops(value)}"
        ratio = speedups.get(key)
        if key != "fp32" and ratio:
            text += f" ({format_ratio(ratio)} fp32)"
        parts.append(text)
    for key, error in measurements.get("errors", {}).items():
        parts.append(f"{MATMUL_LABELS.get(key, key)} failed: {error}")
    return " · ".join(parts) if parts else "not measured"


def fact_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the facts table, shared by the rich and the plain rendering."""
    from minigpt_cli.engine.core.units import format_bytes

    facts = report["facts"]
    cpu = facts["cpu"]
    disk = facts["disk"]
    precision = report["precision"]
    measurements = report["measurements"]
    rows = [
        ("CPU", _cpu_row(cpu, facts["os"]["machine"])),
        ("Cores", _cores_row(cpu)),
        (
            "Memory",
            f"{format_bytes(facts['memory']['total_bytes'])} total, "
            f"{format_bytes(facts['memory']['available_bytes'])} available",
        ),
        (
            "Disk",
            f"{format_bytes(disk['free_bytes'])} free of {format_bytes(disk['total_bytes'])} at "
            f"{disk['checked_path']} (runs go to {disk['runs_dir']})",
        ),
        ("torch", _torch_row(facts["torch"])),
    ]
    accelerators = _accelerator_rows(facts["accelerators"])
    rows.append(("Accelerators", accelerators[0]))
    rows.extend(("", row) for row in accelerators[1:])
    rows.append((f"Matmul ({measurements.get('device', '?')})", _matmul_row(measurements)))
    chosen = precision["dtype_name"]
    if precision["fp32_matmul_precision"] != "highest":
        chosen += f" (matmul precision '{precision['fp32_matmul_precision']}')"
    rows.append(("Precision auto", f"{chosen} on {precision['device']}"))
    rows.append(("", precision["reason"]))
    rows.append(("OS", facts["os"]["platform"]))
    rows.append(("Python", f"{facts['python']['version']} ({facts['python']['executable']})"))
    return rows


def summary_line(checks: list[dict[str, str]]) -> str:
    """One closing line: how many checks warned or failed."""
    failed = sum(check["status"] == "fail" for check in checks)
    warned = sum(check["status"] == "warn" for check in checks)
    if failed:
        return f"{failed} check(s) failed, {warned} warning(s): minigpt cannot work as is."
    if warned:
        return f"All checks passed with {warned} warning(s)."
    return "All checks passed."


PRESET_HEADERS = ("preset", "params", "fits", "micro-batch", "peak / cap", "tokens/s", "time")


def _mb(count: float) -> str:
    """MB as the governor prints them (2^20 bytes)."""
    return f"{count / 2**20:,.0f}"


def preset_rows(recommendation: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row of strings per preset (PRESET_HEADERS), shared by the rich and plain renderings."""
    from minigpt_cli.config.params import format_count
    from minigpt_cli.engine.core.units import format_duration

    budget = format_duration(recommendation["budget_seconds"])
    rows: list[tuple[str, ...]] = []
    for row in recommendation["presets"]:
        if row["fits"]:
            micro = str(row["micro_batch_size"])
            if row["micro_batch_size"] != row["configured_micro_batch_size"]:
                micro += f" (of {row['configured_micro_batch_size']})"
            if row["activation_checkpointing"]:
                micro += " act-ckpt"
        else:
            micro = "-"
        if row["seconds"] is not None:
            marker = "" if row["within_budget"] else " over"
            time_text = f"{format_duration(row['seconds'])} / {budget}{marker}"
        else:
            time_text = row["note"] or "-"
        speed = "-" if row["tokens_per_sec"] is None else f"{row['tokens_per_sec']:,.0f}"
        if row["speed_source"] == "cached":
            speed += " (cached)"  # measured by an earlier doctor: same threads, torch, device
        rows.append(
            (
                row["preset"],
                format_count(row["parameters"]),
                "yes" if row["fits"] else "no",
                micro,
                f"{_mb(row['peak_bytes'])} / {_mb(row['cap_bytes'])} MB",
                speed,
                time_text,
            )
        )
    return rows


def preset_heading(recommendation: dict[str, Any]) -> str:
    """What the preset table was computed for: the caps, threads, budget, device and precision."""
    from minigpt_cli.engine.core.units import format_duration

    budget = format_duration(recommendation["budget_seconds"])
    count = recommendation["threads"]
    threads = f"{count} thread" if count == 1 else f"{count} threads"
    return (
        f"Presets under --max-memory {recommendation['max_memory']} "
        f"({_mb(recommendation['cap_bytes'])} MB), --max-cpu {recommendation['max_cpu']:g} "
        f"({threads}), budget {budget}, "
        f"{recommendation['precision']} on {recommendation['device']}:"
    )


def preset_footnote(recommendation: dict[str, Any]) -> str:
    """How the time column was made, so nobody mistakes it for a promise."""
    return (
        "time = the default run's optimizer steps and validation passes at the measured speed; "
        f"not counted: {'; '.join(recommendation['not_counted'])}"
    )


def recommendation_line(recommendation: dict[str, Any]) -> str:
    """The closing line: the command to run, or that there is none and what to change."""
    if recommendation["command"]:
        return f"recommended: {recommendation['command']}"
    return f"recommended: none ({recommendation['advice']})"


def _symbols(stream: Any) -> dict[str, str]:
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "".join(_SYMBOLS.values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return _ASCII_SYMBOLS
    return _SYMBOLS


def render_plain(report: dict[str, Any], symbols: dict[str, str] | None = None) -> str:
    """The report as plain text (stdout not a terminal): checks, facts, summary."""
    symbols = symbols or _SYMBOLS
    width = max(len(check["name"]) for check in report["checks"])
    lines = [f"minigpt doctor (minigpt {report['minigpt_version']})", ""]
    for check in report["checks"]:
        lines.append(f"{symbols[check['status']]} {check['name']:<{width}}  {check['message']}")
    lines.append("")
    rows = fact_rows(report)
    label_width = max(len(label) for label, _ in rows)
    lines.extend(f"{label:<{label_width}}  {value}" for label, value in rows)
    recommendation = report.get("recommendation")
    if recommendation:
        table = [PRESET_HEADERS, *preset_rows(recommendation)]
        widths = [max(len(row[i]) for row in table) for i in range(len(PRESET_HEADERS) - 1)]
        lines.extend(["", preset_heading(recommendation)])
        for row in table:
            cells = [f"{cell:<{width}}" for cell, width in zip(row, widths, strict=False)]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
        lines.append(preset_footnote(recommendation))
    lines.extend(["", summary_line(report["checks"])])
    if recommendation:
        if recommendation["command"]:
            lines.append(recommendation["advice"])
        lines.append(recommendation_line(recommendation))
    return "\n".join(lines)


def _render_rich(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"[bold]minigpt doctor[/bold] (minigpt {report['minigpt_version']})\n")
    checks = Table(show_header=False, box=None, pad_edge=False, padding=(0, 1, 0, 0))
    checks.add_column(no_wrap=True)
    checks.add_column(no_wrap=True)
    checks.add_column()
    for check in report["checks"]:
        status = check["status"]
        checks.add_row(
            f"[{_STYLES[status]}]{_SYMBOLS[status]}[/]", check["name"], escape(check["message"])
        )
    console.print(checks)
    table = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for label, value in fact_rows(report):
        table.add_row(label, escape(value))
    console.print()
    console.print(table)
    recommendation = report.get("recommendation")
    if recommendation:
        console.print(f"\n{escape(preset_heading(recommendation))}")
        presets = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
        for index, header in enumerate(PRESET_HEADERS):
            presets.add_column(header, justify="right" if index in (1, 5) else "left")
        chosen = recommendation["preset"]
        for row in preset_rows(recommendation):
            presets.add_row(*map(escape, row), style="green" if row[0] == chosen else None)
        console.print(presets)
        console.print(f"[dim]{escape(preset_footnote(recommendation))}[/]")
    failed = any(check["status"] == "fail" for check in report["checks"])
    style = "bold red" if failed else "green"
    console.print(f"\n[{style}]{escape(summary_line(report['checks']))}[/]")
    if recommendation:
        if recommendation["command"]:
            console.print(escape(recommendation["advice"]))
        style = "bold green" if recommendation["command"] else "bold yellow"
        console.print(f"[{style}]{escape(recommendation_line(recommendation))}[/]")


def register(app: typer.Typer) -> None:
    """Add `minigpt doctor`."""

    @app.command("doctor")
    def doctor(
        json_output: Annotated[
            bool,
            typer.Option(
                "--json",
                help="Print one JSON object (facts, measurements, checks, recommendation).",
            ),
        ] = False,
        runs_dir: Annotated[
            Path,
            typer.Option("--runs-dir", help="Where runs are written (free disk is checked there)."),
        ] = Path("runs"),
        max_memory: Annotated[
            str | None,
            typer.Option(
                "--max-memory",
                help="Memory cap to recommend for: percent of RAM (70) or 1.5GB, 6GiB. Default 70.",
            ),
        ] = None,
        max_cpu: Annotated[
            float | None,
            typer.Option("--max-cpu", help="CPU cap to recommend for, percent of logical cores."),
        ] = None,
        budget: Annotated[
            str,
            typer.Option(
                "--budget", help="Time the recommended preset's default run may take: 90s, 30m, 2h."
            ),
        ] = "30m",
    ) -> None:
        """Check this machine and recommend a preset: hardware, matmul speed, precision, presets.

        Measures fp32 and bf16 matmul speed (about a second; cached and used for MFU during
        training), then, preset by preset, the memory the governor would plan under --max-memory
        and the speed of a real training step with the threads --max-cpu allows, until one does
        not fit or would not finish within --budget. Step timings are cached, so a second run is
        quick. Exit status 0 when checks pass or warn, 1 when one fails. A missing GPU is never a
        failure.
        """
        from minigpt_cli.config.loader import load_config
        from minigpt_cli.config.schema import parse_duration

        try:
            budget_seconds = parse_duration(budget)
        except ValueError as error:
            raise UserError(f"--budget: {error}") from None
        overrides: dict[str, Any] = {}
        if max_memory is not None:
            overrides["resources.max_memory"] = max_memory
        if max_cpu is not None:
            overrides["resources.max_cpu"] = max_cpu
        load_config("tiny", None, overrides)  # a bad cap fails here, before anything is measured
        from minigpt_cli.engine.doctor.checks import run_doctor

        # the caps are checked above; every measurement below runs under them
        measure = partial(
            run_doctor,
            runs_dir,
            max_memory=max_memory,
            max_cpu=max_cpu,
            budget_seconds=budget_seconds,
        )
        if json_output:
            report = measure()
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        elif sys.stdout.isatty():
            from rich.console import Console

            with Console(stderr=True).status("Measuring matmul speed...") as status:
                report = measure(on_event=lambda event: status.update(event.data["message"]))
            _render_rich(report)
        else:
            report = measure()
            sys.stdout.write(render_plain(report, _symbols(sys.stdout)) + "\n")
        if report["exit_status"]:
            raise typer.Exit(code=report["exit_status"])
