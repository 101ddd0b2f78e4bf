"""``provision grendel``: Grendel's hosts/images files for GitOps (ClusterFactory)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from provision.boot.base import BootHost, backend_config
from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import dry_run, get_selection, json_output, selection
from provision.errors import BootError
from provision.grendel import GrendelClient, GrendelSettings, export_documents, image_for_export, image_to_doc


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
    site = app.site
    config = backend_config(site)
    settings = GrendelSettings.from_config(config)
    hosts = [BootHost.from_node(n, network=site.network, default_image=site.default_image) for n in nodes]
    image_names = sorted({h.image for h in hosts if h.image})
    images = [image_for_export(name, config, settings.repo_dir) for name in image_names]
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
    client = GrendelClient(GrendelSettings.from_config(backend_config(app.site)))
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
    config = backend_config(app.site)
    settings = GrendelSettings.from_config(config)
    names = sorted({image for n in nodes if (image := n.image or app.site.default_image)})
    images = [image_for_export(str(name), config, settings.repo_dir) for name in names]
    if dry_run:
        click.echo(f"would register {len(images)} images at {settings.where}: {', '.join(names) or '-'}")
        return
    with GrendelClient(settings) as client:
        client.store_images([image_to_doc(i) for i in images])
    click.echo(f"registered {len(images)} images at {settings.where}: {', '.join(names) or '-'}")


def _write_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a watcher (Grendel's fsnotify loader) never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise BootError(f"--output: cannot write {path}: {exc.strerror}", hint="choose a writable directory") from exc
