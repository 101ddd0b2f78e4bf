"""The one door to subprocesses.

argv is always a list, the environment starts clean (plus what the caller
passes), the command is logged only at debug level, and a failure raises
CommandError once. Secrets go through ``env`` or ``input``, never argv.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from provision.errors import CommandError

log = logging.getLogger(__name__)

_BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "USER")


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _BASE_ENV_KEYS if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: str | bytes | None = None,
    capture: bool = True,
    check: bool = True,
    timeout: float | None = None,
    hint: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv; return the completed process or raise CommandError."""
    args = [os.fspath(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    text_input = input.decode() if isinstance(input, bytes) else input
    try:
        proc = subprocess.run(
            args,
            env=base_env(env),
            cwd=Path(cwd) if cwd else None,
            input=text_input,
            stdin=None if text_input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            text=True,
            check=False,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise CommandError(
            f"{args[0]}: command not found",
            hint=hint or f"install the package that provides {args[0]} (see README)",
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{args[0]}: timed out after {timeout} s", hint=hint) from exc
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        detail = ": " + " | ".join(tail) if tail else ""
        log.debug("failed (%d): %s", proc.returncode, shlex.join(args))
        raise CommandError(f"{args[0]} exited {proc.returncode}{detail}", hint=hint)
    return proc


def output(argv: Sequence[str | os.PathLike[str]], *, what: str, timeout: float, hint: str) -> str:
    """A client tool's stdout (scontrol, kubectl). CommandError whose message is ``what`` and the tool's own
    words (cut short) when it cannot run or exits non-zero."""
    try:
        result = run(argv, timeout=timeout, check=False, hint=hint)
    except CommandError as exc:
        raise CommandError(f"{what}: {exc.message}", hint=exc.hint or hint) from exc
    if result.returncode != 0:
        said = " ".join((result.stderr or result.stdout).split())[:300]
        raise CommandError(f"{what}: {said or f'exit {result.returncode}'}", hint=hint)
    return str(result.stdout)


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    pipe: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running process in its own session, output to log_path.

    With ``pipe``, stdin and stdout are pipes to the caller (a way to hand
    over secrets and read a ready line); stderr alone goes to log_path.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("spawn: %s", shlex.join(args))
    with open(log_path, "ab") as out:
        try:
            return subprocess.Popen(
                args,
                env=base_env(env),
                cwd=Path(cwd) if cwd else None,
                stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe else out,
                stderr=out if pipe else subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise CommandError(f"{args[0]}: command not found", hint="see README for the Debian packages") from exc


# -- small process helpers, one each ------------------------------------------

NETNS_DIR = Path("/run/netns")


def netns_argv(netns: str | None, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``argv`` run inside network namespace ``netns`` (as is when None)."""
    args = [os.fspath(a) for a in argv]
    return ["ip", "netns", "exec", netns, *args] if netns else args


def netns_exists(netns: str) -> bool:
    return (NETNS_DIR / netns).exists()


def pid_alive(pid: int | None) -> bool:
    """True for a live process; a zombie is gone (and reaped when it is our child)."""
    if not pid or pid <= 0:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text(errors="replace").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True
