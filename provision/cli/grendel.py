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
from provision.cli.options import get_selection, selection
from provision.errors import BootError
from provision.grendel import GrendelSettings, export_documents, image_for_export


@click.group()
def grendel() -> None:
    """Grendel boot server (ClusterFactory): export its hosts and images."""


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
    """The hosts.json / images.json that Grendel's file loader and the
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
