"""Helpers the test files share: `from helpers import ...` (pytest puts tests/ on sys.path).

The CLI in this process (`invoke`), the CLI as a real process (`factory_popen`, `factory_run`),
the test-only domains folder, and the check that a user mistake ends in one `error: ` line."""
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

TOY_DOMAINS = Path(__file__).resolve().parent / "domains"  # holds the test-only `toy` domain


def domains_path() -> str:
    """FACTORY_DOMAINS_PATH with TOY_DOMAINS first, so the `toy` domain is found (once)."""
    paths = [p for p in os.environ.get("FACTORY_DOMAINS_PATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(TOY_DOMAINS)] + [p for p in paths if p != str(TOY_DOMAINS)])


def invoke(*args):
    """`factory ARGS...` through typer's CliRunner, in this process."""
    # imported here, not at the top: conftest.py imports this module before it sets FACTORY_DOMAINS_PATH
    # and imports factory, and files that never call the CLI in-process need not load it
    from typer.testing import CliRunner

    from factory.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def factory_env(env: dict | None = None) -> dict:
    """The environment of a `python -m factory` process: this one's, the toy domain on
    FACTORY_DOMAINS_PATH, no Python warnings on stderr, then the caller's extras."""
    return {**os.environ, "FACTORY_DOMAINS_PATH": domains_path(), "PYTHONWARNINGS": "ignore", **(env or {})}


def _command(args) -> list[str]:
    return [sys.executable, "-m", "factory", *map(str, args)]


def factory_popen(*args, cwd, env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
    """`factory ARGS...` started as a real process in `cwd`, stdout and stderr piped as text."""
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen_kwargs}
    return subprocess.Popen(_command(args), cwd=cwd, env=factory_env(env), **kwargs)


def factory_run(*args, cwd, env: dict | None = None, timeout: float = 600, **run_kwargs) -> subprocess.CompletedProcess:
    """`factory ARGS...` run to completion as a real process in `cwd`, its output captured as text."""
    kwargs = {"capture_output": True, "text": True, **run_kwargs}
    return subprocess.run(_command(args), cwd=cwd, env=factory_env(env), timeout=timeout, **kwargs)


def file_size_limit(max_bytes: int):
    """A `preexec_fn` for a "full disk": writes past `max_bytes` fail with EFBIG (SIGXFSZ ignored),
    as they fail with ENOSPC on a full disk, without needing a small mount."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


def assert_one_line_error(result, *fragments, code: int = 2, ignore_warnings: bool = False) -> str:
    """A CliRunner result that is a user error: exit `code`, no traceback, no exception but the exit,
    and exactly one output line (besides `warning...` lines if `ignore_warnings`), starting with
    `error: ` and containing every fragment. Returns that line."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    if ignore_warnings:
        lines = [ln for ln in lines if not ln.startswith("warning")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]
