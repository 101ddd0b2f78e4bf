"""Host-key pinning in playbooks/join.yml cannot be turned off by a site's extra SSH arguments.

The playbook builds ``ansible_ssh_extra_args`` from the pinning options and
``join_ssh_extra_args``; OpenSSH keeps the first value it reads for an option,
so what counts is what ``ssh -G`` (OpenSSH's own parser) makes of the rendered
arguments.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import jinja2
import yaml

JOIN = Path(__file__).resolve().parents[1] / "playbooks" / "join.yml"


def rendered_ssh_args(**variables: str) -> list[str]:
    plays = yaml.safe_load(JOIN.read_text())
    task = next(t for t in plays[0]["tasks"] if "ansible_ssh_extra_args" in t.get("ansible.builtin.set_fact", {}))
    template = task["ansible.builtin.set_fact"]["ansible_ssh_extra_args"]
    text = (
        jinja2.Environment()
        .from_string(template)
        .render(
            __join_policy="pinned", __join_known_hosts="/state/known_hosts/cn01", inventory_hostname="cn01", **variables
        )
    )
    return shlex.split(text)


def effective(args: list[str]) -> dict[str, str]:
    out = subprocess.run(["ssh", "-G", *args, "cn01"], capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def test_site_extra_arguments_cannot_turn_pinning_off() -> None:
    args = rendered_ssh_args(
        join_ssh_extra_args="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o HostKeyAlias=other"
    )
    config = effective(args)
    assert config["stricthostkeychecking"] == "true"
    assert config["userknownhostsfile"] == "/state/known_hosts/cn01"
    assert config["hostkeyalias"] == "cn01"


def test_site_extra_arguments_still_apply_to_other_options() -> None:
    config = effective(rendered_ssh_args(join_ssh_extra_args="-o ConnectTimeout=7"))
    assert config["connecttimeout"] == "7" and config["stricthostkeychecking"] == "true"
