"""llama-cpp-python for the GGUF export tests: built once from source into a cache folder.

PyPI has llama-cpp-python only as source (it vendors llama.cpp itself), so using it means
compiling llama.cpp. This builds it once per machine into a folder outside the repository and
the tests import it from there; nothing is installed into the environment.

    python tests/llama_cpp_build.py            # build unless cached (minutes); print the folder
    python tests/llama_cpp_build.py --check    # exit 0 when the cached build imports

How: `pip download` the sdist, switch off the parts the Python binding never loads (llama.cpp's
`common` library with its HTTP client, which the sdist's CMakeLists forces on; LLaVA/mtmd; tools,
examples, tests, server), `pip wheel` it with GGML_NATIVE=OFF (a portable build: a cache folder
may be shared by machines with other CPUs), and `pip install --target` the wheel and diskcache
(its one dependency a test environment lacks) into `<cache>/site`. The tests append that folder
to `sys.path` (appended: the environment's numpy and jinja2 win). A lock file makes concurrent
callers wait for one build, and `load` waits for a build under way: CI starts one in the
background before installing the project and the test that needs it waits, so the compile
overlaps the installs and the rest of the suite. A failed build leaves a log beside the folder
and nothing half-built in it.

The cache: `$MINIGPT_TEST_CACHE`, else `$XDG_CACHE_HOME/minigpt-tests`, else
`~/.cache/minigpt-tests`; one folder per llama-cpp-python version, machine and platform.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

VERSION = "0.3.36"
CMAKE_ARGS = [
    "-DGGML_NATIVE=OFF",
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
]
# The sdist's CMakeLists forces llama.cpp's `common` library on (about 100 files and an HTTP
# client, a third of the build); the binding loads only libllama, so the build switches it off.
_FORCED_COMMON = 'set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)'
_COMMON_OFF = 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "Build llama.cpp common library" FORCE)'


def cache_root() -> Path:
    """Where builds are cached (see the module docstring)."""
    if os.environ.get("MINIGPT_TEST_CACHE"):
        return Path(os.environ["MINIGPT_TEST_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "minigpt-tests"


def build_dir() -> Path:
    """This version's folder for this machine and platform."""
    return cache_root() / f"llama-cpp-python-{VERSION}-{sys.platform}-{platform.machine()}"


def site_dir() -> Path:
    """The folder the tests put on `sys.path`: present only when a build completed."""
    return build_dir() / "site"


def log_path() -> Path:
    return build_dir().with_name(build_dir().name + ".log")


def failed_marker() -> Path:
    """Present after a build failed: the tests then skip at once instead of retrying (offline, a
    retry costs pip's network timeouts every session); running this script retries."""
    return build_dir().with_name(build_dir().name + ".failed")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{build_dir().name}.lock", "a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: one build at a time is up to the caller
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(
            command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[:5])} ...` failed; see {log}")


def build(jobs: int | None = None) -> Path:
    """Build and cache llama-cpp-python unless cached; returns the folder to put on sys.path.
    Raises RuntimeError (the log's path in the message) when it cannot be built."""
    with _locked():
        site = site_dir()
        if site.is_dir():
            return site
        failed_marker().unlink(missing_ok=True)
        try:
            return _build(site, jobs)
        except BaseException as error:
            failed_marker().write_text(f"{error}\n")
            raise


def _build(site: Path, jobs: int | None) -> Path:
    """The build itself, under the lock (see the module docstring)."""
    if shutil.which("cmake") is None:
        raise RuntimeError("cannot build llama-cpp-python: no cmake on PATH")
    log = log_path()
    log.write_text(f"building llama-cpp-python {VERSION} ({time.ctime()})\n")
    start = time.perf_counter()
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".build-") as scratch:
        work = Path(scratch)
        _run(
            [*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", str(work)]
            + [f"llama-cpp-python=={VERSION}"],
            log,
        )
        (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        (source,) = (p for p in work.iterdir() if p.is_dir())
        cmakelists = source / "CMakeLists.txt"
        text = cmakelists.read_text()
        if _FORCED_COMMON in text:
            cmakelists.write_text(text.replace(_FORCED_COMMON, _COMMON_OFF))
        env = {
            "CMAKE_ARGS": " ".join(CMAKE_ARGS),
            "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs or os.cpu_count() or 1),
        }
        wheels = work / "wheels"
        _run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(source)], log, env)
        (wheel,) = wheels.glob("llama_cpp_python-*.whl")
        staged = work / "site"
        _run(
            [*pip, "install", "--no-deps", "--target", str(staged), str(wheel)]
            + ["diskcache>=5.6"],
            log,
        )
        seconds = time.perf_counter() - start
        info = {"version": VERSION, "cmake_args": CMAKE_ARGS, "build_seconds": seconds}
        (staged / "minigpt-build.json").write_text(json.dumps(info, indent=2) + "\n")
        site.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, site)
    with log.open("a") as handle:
        handle.write(f"built in {seconds:.0f} s\n")
    return site


def load(*, build_if_missing: bool = False) -> tuple[ModuleType | None, str]:
    """`llama_cpp`, imported from the environment or the cache (built first when
    `build_if_missing`), or None and the reason it is not available."""
    with contextlib.suppress(ImportError):
        return importlib.import_module("llama_cpp"), "installed"
    site = site_dir()
    if not site.is_dir() and cache_root().is_dir():
        with _locked():  # a build under way (CI starts one in the background): wait for it
            pass
    if not site.is_dir():
        if not build_if_missing:
            failed = " (the last build failed)" if failed_marker().is_file() else ""
            return None, (
                f"llama-cpp-python is not built here{failed}: `python tests/llama_cpp_build.py` "
                f"builds it once into {build_dir()} (minutes)"
            )
        if failed_marker().is_file():
            return None, (
                f"llama-cpp-python did not build here ({failed_marker().read_text().strip()}); "
                "`python tests/llama_cpp_build.py` tries again"
            )
        try:
            build()
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            return None, f"llama-cpp-python could not be built: {error}"
    if str(site) not in sys.path:
        sys.path.append(str(site))
    try:
        return importlib.import_module("llama_cpp"), str(site)
    except (ImportError, OSError) as error:
        return None, f"llama-cpp-python in {site} does not import: {error}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the cached build")
    parser.add_argument("--jobs", type=int, help="compiler processes (default: the CPUs)")
    args = parser.parse_args()
    if args.check:
        module, where = load()
        print(where if module is not None else f"not available: {where}")
        raise SystemExit(0 if module is not None else 1)
    try:
        site = build(args.jobs)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        tail = log_path().read_text().splitlines()[-15:] if log_path().is_file() else []
        sys.stderr.write("\n".join(tail) + f"\n{error}\n")
        raise SystemExit(1) from None
    info = json.loads((site / "minigpt-build.json").read_text())
    print(f"{site} (built in {info['build_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
