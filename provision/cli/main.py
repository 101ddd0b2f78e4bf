"""The ``provision`` root command and its global options."""

from __future__ import annotations

import logging
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler

from provision import __version__
from provision.cli import boot as boot_cmd
from provision.cli import grendel as grendel_cmd
from provision.cli import image as image_cmd
from provision.cli import inventory as inventory_cmd
from provision.cli import lab as lab_cmd
from provision.cli import node as node_cmd
from provision.cli import rollout as rollout_cmd
from provision.cli import service as service_cmd
from provision.cli.context import AppContext


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--inventory",
    "-i",
    "inventory_path",
    type=click.Path(path_type=Path),
    default=Path("inventory"),
    show_default=True,
    envvar="PROVISION_INVENTORY",
    help="The site inventory (an Ansible inventory directory or file).",
)
@click.option(
    "--vault-password-file",
    type=click.Path(dir_okay=False),
    envvar="ANSIBLE_VAULT_PASSWORD_FILE",
    help="Ansible Vault password file for vaulted BMC passwords.",
)
@click.option("--debug", is_flag=True, help="Log every command and show tracebacks.")
@click.option("-v", "--verbose", count=True, help="More output (repeatable).")
@click.version_option(__version__, prog_name="provision")
@click.pass_context
def cli(ctx: click.Context, inventory_path: Path, vault_password_file: str | None, debug: bool, verbose: int) -> None:
    """Take racks of bare-metal servers from powered off to Slurm and k0s nodes.

    \b
    The site is an Ansible inventory: racks are groups named rack_<name>,
    nodes carry provision_mac, provision_ip, provision_bmc_* and
    provision_image. Select nodes with --rack r1, --nodes 'cn[01-04]' or --all.
    """
    level = logging.DEBUG if debug else (logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, markup=False)],
    )
    ctx.obj = AppContext(
        inventory_path=inventory_path, vault_password_file=vault_password_file, debug=debug, verbose=verbose
    )


cli.add_command(inventory_cmd.inventory)
cli.add_command(image_cmd.image)
image_cmd.image.add_command(rollout_cmd.rollout_cmd)
cli.add_command(node_cmd.node)
cli.add_command(grendel_cmd.grendel)
cli.add_command(boot_cmd.boot)
cli.add_command(lab_cmd.lab)
cli.add_command(service_cmd.service)
