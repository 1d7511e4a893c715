"""`minigpt serve RUN [RUN ...]`: trained runs behind an OpenAI-compatible API and a chat page.

Everything that can be refused is refused before the server starts, each as one line and exit
status 2: a run directory that does not exist, the optional `serve` extra not installed (fastapi,
uvicorn), the port taken, a model that does not fit `--max-memory`. The socket is bound here, before
the models load, so a taken port is reported at once, and then handed to uvicorn as it is (no
window in which another program could take it). The API and page are `engine/serve/`.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from minigpt_cli.cli import common, decoding
from minigpt_cli.errors import UserError

INSTALL_HINT = "pip install 'minigpt-cli[serve]'"


def _require_extra() -> None:
    """One line naming the install command when fastapi or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"minigpt serve needs the serve extra ({error.name or 'fastapi'} is not installed): "
            f"{INSTALL_HINT}"
        ) from None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port` (port 0: a free one), or one line saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UserError(
            f"--host {host}: not an address of this machine ({error.strerror})"
        ) from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        reason = "it is in use" if error.errno == 98 else (error.strerror or str(error))
        raise UserError(
            f"cannot listen on {host}:{port}: {reason} (choose another with --port)"
        ) from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Run directories to serve, one model each (e.g. runs/sft-tiny)."),
    ],
    name: Annotated[
        list[str] | None,
        typer.Option(
            "--name",
            help="Model name for the run in the same position (repeatable); default: the run "
            "folder's name.",
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on; 0.0.0.0 lets other machines connect."),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="MINIGPT_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1 (also $MINIGPT_API_KEY).",
        ),
    ] = None,
    device: decoding.DeviceOpt = "auto",
    max_memory: common.MaxMemoryOpt = None,
    max_cpu: decoding.MaxCpuOpt = None,
    threads: decoding.ThreadsOpt = None,
    quantize: decoding.QuantizeOpt = None,
) -> None:
    """Serve runs over an OpenAI-compatible API (/v1) with a chat page at /.

    Any OpenAI client works with base URL http://HOST:PORT/v1 and the run's name as the model:
    minigpt serve runs/sft-tiny  then open http://127.0.0.1:8000/ in a browser.
    """
    for run in runs:
        if not run.is_dir():
            raise UserError(f"{run}: no such run directory")
    names = list(name or [])
    if len(names) > len(runs):
        raise UserError(f"{len(names)} --name options for {len(runs)} run(s): one name per run")
    names += [run.resolve().name for run in runs[len(names) :]]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise UserError(f"two runs are served under the name {twice!r}: give each a --name")
    _require_extra()

    from minigpt_cli.config.schema import ResourcesConfig, parse_memory
    from minigpt_cli.engine.hardware.monitor import physical_memory_bytes

    cap_text = max_memory if max_memory is not None else ResourcesConfig().max_memory
    try:
        cap = parse_memory(cap_text, physical_memory_bytes())
    except ValueError as error:
        raise UserError(f"--max-memory {cap_text}: {error}") from None
    sock = bind(host, port)
    try:
        _serve_on(sock, runs, names, host, api_key, device, cap, max_cpu, threads, quantize)
    finally:
        sock.close()


def _serve_on(
    sock: socket.socket,
    runs: list[Path],
    names: list[str],
    host: str,
    api_key: str | None,
    device: str,
    cap: int,
    max_cpu: float | None,
    threads: int | None,
    quantize: str | None,
) -> None:
    import uvicorn

    from minigpt_cli.engine.hardware.monitor import tree_rss_bytes
    from minigpt_cli.engine.serve.app import create_app
    from minigpt_cli.engine.serve.completion import Engine, ServedModel

    served = []
    for run, model_name in zip(runs, names, strict=True):
        loaded, _target = decoding.load_for_decoding(
            run, device, max_cpu=max_cpu, threads=threads, quantize=quantize
        )
        served.append(ServedModel(model_name, loaded, int(run.stat().st_mtime)))
    engine = Engine(served, memory_cap_bytes=cap)
    engine.warm_up()
    held = tree_rss_bytes()
    if held > cap:
        raise UserError(
            f"the models take {held / 2**20:,.0f} MB, over --max-memory {cap / 2**20:,.0f} MB: "
            "serve fewer runs or raise the cap"
        )

    def log(line: str) -> None:
        sys.stderr.write(f"minigpt serve: {line}\n")
        sys.stderr.flush()

    app = create_app(engine, api_key, log)

    bound_port = sock.getsockname()[1]
    base = f"http://{_url_host(host)}:{bound_port}"
    kinds = ", ".join(f"{m.name} ({'chat' if m.chat else 'base'})" for m in served)
    reach = (
        "only this machine can connect: --host 0.0.0.0 lets others"
        if host in ("127.0.0.1", "localhost", "::1")
        else f"on {host}: other machines can connect"
    )
    guard = ", API key required" if api_key else ""
    sys.stdout.write(
        f"minigpt serve: chat page {base}/ , OpenAI API base URL {base}/v1\n"
        f"({reach}{guard})\n"
        f"models: {kinds}. Ctrl-C stops.\n"
    )
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    # uvicorn shuts down gracefully on Ctrl-C and then re-raises it: stopping a server is how it
    # ends normally, not an interruption of unfinished work.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    sys.stdout.write("minigpt serve: stopped\n")


def register(app: typer.Typer) -> None:
    """Add `minigpt serve`."""
    app.command("serve")(serve)
