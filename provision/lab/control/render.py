"""The control node's files from the templates in provision/lab/templates."""

from __future__ import annotations

import functools
import os
import pwd
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from provision.files import write_atomic
from provision.lab.control.config import ControlPlaneConfig, ControlPlanePaths
from provision.lab.sandbox import ANCHOR

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
# Slurm commands with a wrapper in bin/ that runs them inside the control node.
WRAPPED = ("sinfo", "scontrol", "squeue", "srun", "sbatch", "scancel")


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, dest: Path, variables: Mapping[str, Any], mode: int) -> None:
    """Render ``template`` into ``dest`` (atomically, with ``mode`` from the start)."""
    write_atomic(dest, _environment().get_template(template).render(**variables), mode=mode)


def write_slurm_conf(paths: ControlPlanePaths, config: ControlPlaneConfig) -> None:
    """slurm.conf and cgroup.conf, served to the nodes (configless)."""
    c = config
    variables = {
        "cluster_name": c.cluster_name,
        "hostname": c.hostname,
        "address": c.address,
        "slurmctld_port": c.slurmctld_port,
        "slurmd_port": c.slurmd_port,
        "slurm_user": pwd.getpwuid(os.geteuid()).pw_name,
        "state_save": paths.slurm_state,
        "slurmctld_pid_file": paths.pids / "slurmctld.daemon.pid",
        "slurmctld_log_file": paths.logs / "slurmctld.log",
        "slurmd_spool_dir": c.slurmd_spool_dir,
        "slurmd_log_file": c.slurmd_log_file,
        "cgroups": c.cgroups,
        "config_overrides": c.config_overrides,
        "nodes": c.nodes,
        "partition": c.partition,
    }
    render("slurm.conf.j2", paths.slurm_conf, variables, 0o644)
    render("cgroup.conf.j2", paths.etc / "cgroup.conf", {"cgroups": c.cgroups}, 0o644)


def write_wrappers(paths: ControlPlanePaths) -> None:
    """``bin/lab-exec`` (enters the control node) and one wrapper per Slurm command."""
    exec_path = paths.bin / "lab-exec"
    variables = {"anchor_pid_file": paths.pids / f"{ANCHOR}.pid", "slurm_conf": paths.slurm_conf}
    render("lab-exec.j2", exec_path, variables, 0o755)
    for tool in WRAPPED:
        write_atomic(paths.bin / tool, f'#!/bin/sh\nexec "{exec_path}" {tool} "$@"\n', mode=0o755)
