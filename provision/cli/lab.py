"""``provision lab``: a virtual rack (QEMU machines behind virtual BMCs) on this machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from provision import inventory
from provision.boot.base import backend_for
from provision.cli.context import emit_json
from provision.cli.options import json_output
from provision.lab.rack import DEFAULT_IMAGE, DEFAULT_STATE_DIR, BmcKind, Rack, RackConfig
from provision.serve import serve as serve_site
from provision.serve import stop as stop_site

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    envvar="PROVISION_LAB_STATE_DIR",
    help="Where the rack lives: its record, inventory/, secrets/ (0700), machines/ (disks, console logs), "
    "vbmc/, control/, site/ (boot server state). Relative to the current directory; "
    "env PROVISION_LAB_STATE_DIR.",
)


def _lab_site(rack: Rack) -> inventory.Site:
    """The rack's generated inventory, with its vault password file."""
    return inventory.load(rack.inventory, vault_password_file=str(rack.vault_password_file))


def _boot_stop(rack: Rack) -> list[str]:
    if not (rack.inventory / "hosts.yml").exists():
        return []
    return stop_site(_lab_site(rack))


def _boot_serve(rack: Rack) -> dict[str, Any]:
    site = _lab_site(rack)
    served = serve_site(site, site.nodes, activate=True, vault_password_file=str(rack.vault_password_file))
    return {
        "images": dict(served.boot.images),
        "services": {s.service: s.pid for s in served.boot.services},
        "url": served.boot.where,
        "join": served.join.as_dict(),
    }


@click.group()
def lab() -> None:
    """A virtual rack on this machine, to try and test provision end to end (needs root).

    \b
    provision lab up --nodes 3      namespace + bridge, QEMU machines (off) behind
                                    virtual BMCs, control node, boot server, inventory
    provision lab status            what runs
    provision lab down              remove all of it (safe twice)
    """


@lab.command()
@click.option("--nodes", "count", type=click.IntRange(1, 64), default=3, show_default=True, help="Machines.")
@click.option("--rack", default="r1", show_default=True, help="Rack name: the inventory group is rack_<name>.")
@click.option("--netns", default="provision-lab", show_default=True, help="Network namespace to create.")
@click.option("--network", default="10.99.0.0/24", show_default=True, help="Provisioning subnet (in the namespace).")
@click.option("--memory", "memory_mib", type=click.IntRange(256), default=1536, show_default=True, help="MiB each.")
@click.option(
    "--image",
    default=DEFAULT_IMAGE,
    show_default=True,
    help="The image the machines boot (provision_default_image of the generated inventory).",
)
@click.option(
    "--image-store",
    type=click.Path(file_okay=False, path_type=Path),
    help="An existing image store to boot from (provision_image_store; default STATE/site/images).",
)
@click.option(
    "--bmc",
    "bmc_kind",
    type=click.Choice([k.value for k in BmcKind]),
    default=BmcKind.PYGHMI.value,
    show_default=True,
    help="BMC implementation in front of the machines: pyghmi (provision's virtual BMCs), "
    "openipmi (OpenIPMI's ipmi_sim per machine), redfish (sushy-tools' sushy-emulator for the rack, "
    "HTTPS + basic auth, one system per machine).",
)
@state_dir_option
@json_output
def up(
    count: int,
    rack: str,
    netns: str,
    network: str,
    memory_mib: int,
    image: str,
    image_store: Path | None,
    bmc_kind: str,
    state_dir: Path,
    as_json: bool,
) -> None:
    """Build the virtual rack; the machines stay powered off until their BMC powers them on.

    \b
    Each machine: 1 vCPU, --memory MiB, a blank 1 GiB disk, a virtio NIC
    (iPXE ROM) on a tap in the namespace, serial console in
    STATE/machines/NAME.console.log; KVM when a short probe shows it can
    run firmware, else TCG (reported). One virtual BMC per machine on
    127.0.0.1 (real IPMI), or with --bmc redfish one sushy-emulator for the
    rack (Redfish over HTTPS, a system per machine named after it). The boot server starts without any image; build
    and publish one later (`lab down` keeps the image store
    STATE/site/images when it is not empty).

    The BMC password is random and stored vault-encrypted in the generated
    inventory; point the normal commands at it with
    `provision -i STATE/inventory --vault-password-file STATE/secrets/vault-password ...`.
    """
    config = RackConfig(
        nodes=count,
        rack=rack,
        netns=netns,
        network=network,
        memory_mib=memory_mib,
        image=image,
        image_store=str(image_store.resolve()) if image_store else None,
        bmc=BmcKind(bmc_kind),
    )
    the_rack = Rack(state_dir)
    the_rack.up(config)
    try:
        boot = _boot_serve(the_rack)
    except BaseException:
        the_rack.down(stop_boot=lambda: _boot_stop(the_rack))
        raise
    status = {**the_rack.status(), "boot": boot}
    if as_json:
        emit_json(status)
        return
    _print_status(status)
    inv, vpf = status["inventory"], status["vault_password_file"]
    click.echo("\nuse it with:")
    click.echo(f"  export PROVISION_INVENTORY={inv} ANSIBLE_VAULT_PASSWORD_FILE={vpf}")
    click.echo(f"  provision node power status --rack {rack}")


@lab.command()
@state_dir_option
@json_output
def down(state_dir: Path, as_json: bool) -> None:
    """Remove the rack: boot services, control node, BMCs, machines, taps, bridge, namespace, files."""
    the_rack = Rack(state_dir)
    removed = the_rack.down(stop_boot=lambda: _boot_stop(the_rack))
    if as_json:
        emit_json({"removed": removed})
        return
    click.echo(f"removed {len(removed)} items" if removed else "nothing to remove")
    for item in removed:
        click.echo(f"  {item}")


@lab.command()
@state_dir_option
@json_output
def status(state_dir: Path, as_json: bool) -> None:
    """Machines (power, QEMU pid, BMC port), control node and namespace of the rack."""
    the_rack = Rack(state_dir)
    info = the_rack.status()
    if info["up"] and (the_rack.inventory / "hosts.yml").exists():
        site = _lab_site(the_rack)
        info["boot"] = {"services": {s.service: s.pid for s in backend_for(site).status()}}
    if as_json:
        emit_json(info)
        return
    if not info["up"]:
        click.echo(f"no virtual rack in {os.fspath(state_dir)}")
        return
    _print_status(info)


def _bmc_line(info: dict[str, Any]) -> str:
    kind = info.get("bmc", "pyghmi")
    if kind == "redfish":
        redfish = info.get("redfish", {})
        return (
            f"BMCs: sushy-emulator {redfish.get('url', '')} pid {redfish.get('emulator_pid') or 'down'}, "
            f"notification receiver pid {redfish.get('receiver_pid') or 'down'}"
        )
    if kind == "openipmi":
        return f"BMCs: ipmi_sim pids {', '.join(map(str, info.get('bmc_pids', []))) or 'down'}"
    return f"virtual BMCs pid {info.get('vbmc_pid') or 'down'}"


def _print_status(info: dict[str, Any]) -> None:
    click.echo(f"rack {info['rack']} in netns {info['netns']} (server {info['server_address']}), accel {info['accel']}")
    for node in info["nodes"]:
        qemu = f", qemu pid {node['qemu_pid']}" if node.get("qemu_pid") else ""
        click.echo(
            f"  {node['name']}  {node['ip']}  {node['mac']}  bmc 127.0.0.1:{node['bmc_port']}  {node['power']}{qemu}"
        )
    control = ", ".join(f"{k} {v or 'down'}" for k, v in info.get("control", {}).items())
    click.echo(f"control node: {control or 'down'}; {_bmc_line(info)}")
    boot = info.get("boot", {})
    if boot:
        services = ", ".join(f"{k} {v or 'down'}" for k, v in boot.get("services", {}).items())
        click.echo(f"boot server: {services}")
        for name, state in boot.get("images", {}).items():
            click.echo(f"  image {name}: {state}")
    click.echo(f"inventory: {info['inventory']}")
    click.echo(f"vault password file: {info['vault_password_file']} (0600; never printed)")


__all__ = ["lab"]
