"""`minigpt doctor`: what this machine can do, readable at a glance, or as JSON for a bug report.

Exit status: 0 when every check passes or only warns, 1 when a check fails (too old Python or
torch, an unwritable runs directory, a matmul giving wrong answers). Lacking a GPU is never a
failure. torch and rich are imported inside the command so `minigpt --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

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
    from minigpt_cli.engine.doctor import format_bytes

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
    from minigpt_cli.engine.doctor import MATMUL_LABELS, format_gflops, format_ratio

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
    from minigpt_cli.engine.doctor import format_bytes

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
    lines.extend(["", summary_line(report["checks"])])
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
    failed = any(check["status"] == "fail" for check in report["checks"])
    style = "bold red" if failed else "green"
    console.print(f"\n[{style}]{escape(summary_line(report['checks']))}[/]")


def register(app: typer.Typer) -> None:
    """Add `minigpt doctor`."""

    @app.command("doctor")
    def doctor(
        json_output: Annotated[
            bool,
            typer.Option("--json", help="Print one JSON object (facts, measurements, checks)."),
        ] = False,
        runs_dir: Annotated[
            Path,
            typer.Option("--runs-dir", help="Where runs are written (free disk is checked there)."),
        ] = Path("runs"),
    ) -> None:
        """Check this machine: hardware, measured matmul speed, and the precision auto picks.

        Takes about a second to measure fp32 and bf16 matmul speed; the figures are cached and
        used for MFU during training. Exit status 0 when checks pass or warn, 1 when one fails.
        A missing GPU is never a failure.
        """
        from minigpt_cli.engine.doctor import diagnose

        if json_output:
            report = diagnose(runs_dir)
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        elif sys.stdout.isatty():
            from rich.console import Console

            with Console(stderr=True).status("Measuring matmul speed..."):
                report = diagnose(runs_dir)
            _render_rich(report)
        else:
            report = diagnose(runs_dir)
            sys.stdout.write(render_plain(report, _symbols(sys.stdout)) + "\n")
        if report["exit_status"]:
            raise typer.Exit(code=report["exit_status"])
