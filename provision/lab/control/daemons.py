"""munged, slapd and slurmctld as foreground processes inside the control node's sandbox."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from provision.lab.control.config import ControlPlaneConfig, ControlPlaneError, ControlPlanePaths
from provision.lab.control.directory import slapd_urls
from provision.lab.sandbox import Sandbox

MUNGE_SOCKET = "/run/munge/munge.socket.2"
DAEMONS = ("munged", "slapd", "slurmctld")


def _log_tail(paths: ControlPlanePaths, log: str) -> str:
    try:
        lines = (paths.logs / log).read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "no log"
    return " | ".join(lines[-3:]) or "no output"


def wait_ready(
    sandbox: Sandbox, paths: ControlPlanePaths, what: str, ready: Callable[[], bool], timeout: float
) -> None:
    """Wait until ``ready()``; raise if ``what`` exits first or the time is up (naming its log)."""
    log = f"{what}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sandbox.pid(what) is None:
            raise ControlPlaneError(
                f"{what} exited while starting: {_log_tail(paths, log)}", hint=f"see {paths.logs / log}"
            )
        if ready():
            return
        time.sleep(0.1)
    raise ControlPlaneError(f"{what} not ready after {timeout:.0f} s", hint=f"see {paths.logs / log}")


def start_munged(sandbox: Sandbox, paths: ControlPlanePaths, config: ControlPlaneConfig, timeout: float) -> None:
    argv = [
        "munged",
        "--foreground",
        f"--socket={MUNGE_SOCKET}",
        f"--key-file={paths.munge_key}",
        f"--pid-file={paths.pids / 'munged.daemon.pid'}",
        f"--log-file={paths.logs / 'munged.daemon.log'}",
        f"--seed-file={paths.sandbox / 'munged.seed'}",
        f"--origin={config.address}",
    ]
    sandbox.spawn("munged", argv)
    wait_ready(sandbox, paths, "munged", lambda: sandbox.path(MUNGE_SOCKET).is_socket(), timeout)


def start_slapd(
    sandbox: Sandbox, paths: ControlPlanePaths, config: ControlPlaneConfig, timeout: float, answers: Callable[[], bool]
) -> None:
    """slapd; ready when ``answers()`` (a search succeeds)."""
    # -d: stay in the foreground (logs on stderr, into the log file).
    sandbox.spawn("slapd", ["slapd", "-d", "stats", "-f", paths.etc / "slapd.conf", "-h", " ".join(slapd_urls(config))])
    wait_ready(sandbox, paths, "slapd", answers, timeout)


def start_slurmctld(
    sandbox: Sandbox, paths: ControlPlanePaths, env: Mapping[str, str], timeout: float, up: Callable[[], bool]
) -> None:
    """slurmctld; ready when ``up()`` (``scontrol ping`` says UP)."""
    sandbox.spawn("slurmctld", ["slurmctld", "-D", "-f", paths.slurm_conf], env=env)
    wait_ready(sandbox, paths, "slurmctld", up, timeout)
