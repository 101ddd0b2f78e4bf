"""``provision grendel``: Grendel's hosts/images files for GitOps (ClusterFactory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from provision.boot.base import site_hosts
from provision.boot.grendel import GrendelBackend
from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import dry_run, get_selection, json_output, selection
from provision.errors import BootError
from provision.files import write_atomic
from provision.grendel import GrendelClient, GrendelSettings, export_documents, image_for_export
from provision.inventory import Site


def _grendel(site: Site) -> GrendelBackend:
    """The site's Grendel, whatever provision_boot_backend says (these commands are Grendel's own)."""
    return GrendelBackend.from_config(site.settings.backend_vars())


@click.group()
def grendel() -> None:
    """Grendel boot server (ClusterFactory): export, push images, status."""


@grendel.command()
@selection
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write DIR/hosts.json and DIR/images.json instead of printing.",
)
@click.option("--only", type=click.Choice(["hosts", "images"]), help="Print only the hosts or the images array.")
@pass_app
def export(app: AppContext, output: Path | None, only: str | None) -> None:
    """Print or write Grendel's hosts.json and images.json (GitOps).

    The files Grendel's file loader (grendel serve --hosts/--images) and the
    ClusterFactory Helm chart (config.hosts / config.images) take.

    \b
    Without --output, prints {"hosts": [...], "images": [...]} (or one array
    with --only). Image paths follow provision_grendel_repo_dir
    (<repo>/<image>/vmlinuz, initramfs.img, rootfs.squashfs) unless
    provision_grendel_images overrides them.
    """
    nodes = app.select(get_selection())
    config = app.site.settings.backend_vars()
    settings = GrendelSettings.from_config(config)  # files only: no API needed
    hosts = site_hosts(app.site, nodes)
    images = [image_for_export(name, config, settings.repo_dir) for name in sorted({h.image for h in hosts if h.image})]
    docs = export_documents(hosts, images, settings)
    if output is None:
        emit_json(docs[only] if only else docs)
        return
    written = []
    for key in ("hosts", "images") if not only else (only,):
        path = output / f"{key}.json"
        _write_atomic(path, docs[key])
        written.append(f"{len(docs[key])} {key} to {path}")
    click.echo("wrote " + ", ".join(written))


@grendel.command()
@json_output
@pass_app
def status(app: AppContext, as_json: bool) -> None:
    """Show which Grendel API answers, and what it holds."""
    client = GrendelClient(GrendelSettings.from_config(app.site.settings.backend_vars()))
    with client:
        api = client.api
        hosts, images = client.list_hosts(), client.list_images()
    image_names = sorted(str(i["name"]) for i in images)
    info: dict[str, Any] = {
        "api": str(api),
        "where": client.settings.where,
        "hosts": len(hosts),
        "provisioning": sum(1 for h in hosts if h.get("provision")),
        "images": image_names,
    }
    if as_json:
        emit_json(info)
        return
    click.echo(
        f"grendel {api} API at {info['where']}: {info['hosts']} hosts ({info['provisioning']} set to provision), "
        f"{len(images)} images{': ' + ', '.join(image_names) if images else ''}"
    )


@grendel.command("push-images")
@selection
@dry_run
@pass_app
def push_images(app: AppContext, dry_run: bool) -> None:
    """Register the selected nodes' images through the API.

    The same image documents as `export` (provision_grendel_repo_dir layout or
    provision_grendel_images); the kernel, initrd and squashfs files must
    already be in Grendel's repo directory.
    """
    nodes = app.select(get_selection())
    names = sorted({image for n in nodes if (image := n.image or app.site.default_image)})
    backend = _grendel(app.site)
    try:
        images = backend.register_images(names, dry_run=dry_run)  # the path `image publish --to grendel` takes
    finally:
        backend.close()
    verb = "would register" if dry_run else "registered"
    click.echo(f"{verb} {len(images)} images at {backend.settings.where}: {', '.join(names) or '-'}")


def _write_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a watcher (Grendel's fsnotify loader) never sees half a file."""
    try:
        write_atomic(path, json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise BootError(f"--output: cannot write {path}: {exc.strerror}", hint="choose a writable directory") from exc
