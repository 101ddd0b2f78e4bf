"""``provision image``: build, list, show, roll back and remove images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.status import Status
from rich.table import Table

from provision.ansible import EventKind, TaskEvent
from provision.boot.base import BackendName
from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import dry_run, json_output
from provision.errors import ImageError
from provision.image import definition as image_definition
from provision.image.build import Stage, build, plan
from provision.image.cache import BootstrapCache
from provision.image.ccache import CompilerCache
from provision.image.chroot import isolate_mounts, require_root
from provision.image.store import ImageStore, ImageVersion
from provision.inventory import Site

err = Console(stderr=True, highlight=False)

store_option = click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    help="Image store directory (default: provision_image_store, else <site state dir>/images).",
)


def _site(app: AppContext) -> Site | None:
    """The site when an inventory is there; image commands work without one given --store."""
    return app.site if app.inventory_path.exists() else None


def _store(app: AppContext, store: Path | None) -> ImageStore:
    if store is not None:
        return ImageStore(store.resolve())
    site = _site(app)
    if site is None:
        raise ImageError(
            f"no inventory at {app.inventory_path} and no --store",
            hint="pass -i INVENTORY (its provision_state_dir holds images/) or --store DIR",
        )
    return ImageStore(site.settings.image_store)


def _definition(app: AppContext, name: str | None) -> image_definition.ImageDefinition:
    site = _site(app)
    return image_definition.for_site(name, site.settings if site is not None else None)


class RichProgress:
    """Stage lines and a spinner with the current Ansible task, on stderr."""

    def __init__(self, console: Console, verbose: int) -> None:
        self.console = console
        self.verbose = verbose
        self.status: Status | None = None
        self.title = ""

    def stage_started(self, stage: Stage, title: str) -> None:
        self.title = title
        self.status = self.console.status(f"[bold]{stage.value}[/]: {title}")
        self.status.start()

    def stage_finished(self, stage: Stage, seconds: float, detail: str) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
        self.console.print(f"[green]✓[/] {stage.value:<10} {seconds:7.1f} s  {detail}")

    def message(self, text: str) -> None:
        self.console.print(f"  {text}", markup=False)

    def task(self, event: TaskEvent) -> None:
        if event.kind is EventKind.TASK and self.status is not None:
            self.status.update(f"[bold]roles[/]: {event.task}")
        if self.verbose and event.kind in (EventKind.CHANGED, EventKind.OK, EventKind.SKIPPED):
            self.console.print(f"  {event.kind.value:<8} {event.role + ' : ' if event.role else ''}{event.task}")
        if event.kind in (EventKind.FAILED, EventKind.UNREACHABLE) and not event.ignored:
            self.console.print(f"  [red]{event.kind.value}[/] {event}", markup=True)

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


@click.group()
def image() -> None:
    """Stateless images built from Ansible roles, and the image store."""


@image.command("build")
@click.argument("name", required=False)
@store_option
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="PROVISION_CACHE_DIR",
    help="Build cache: bootstrap trees and ccache (default: $PROVISION_CACHE_DIR or ~/.cache/provision).",
)
@dry_run
@json_output
@pass_app
def build_cmd(
    app: AppContext, name: str | None, store: Path | None, cache_dir: Path | None, dry_run: bool, as_json: bool
) -> None:
    """Build image NAME (default: the site's provision_default_image) and publish it."""
    definition = _definition(app, name)
    image_store = _store(app, store)
    cache = BootstrapCache(cache_dir)
    if dry_run:
        data = plan(definition, image_store, cache)
        if as_json:
            emit_json(data)
        else:
            hit = "hit" if data["bootstrap"]["cache_hit"] else "miss"
            err.print(f"would build {definition.name} ({definition.distro.value} {definition.release})")
            boot = data["bootstrap"]
            if boot["cache_key"]:
                err.print(f"  bootstrap: {boot['tool']}, cache {hit} {boot['cache_key'][:12]}")
            else:
                err.print(f"  bootstrap: {boot['tool']}: {boot['tool_problem']}")
            err.print(f"  roles: {', '.join(definition.roles)}")
            err.print(f"  store: {image_store.root} (current: {data['current'] or 'none'})")
        return
    require_root()
    # Before any thread exists: a private mount namespace, so that even a
    # SIGKILLed build leaves no mount in the host's namespace.
    isolated = isolate_mounts()
    if not isolated and app.debug:
        err.print("note: no private mount namespace; mounts are cleaned up by the build itself")
    progress = RichProgress(err, app.verbose)
    err.print(f"building [bold]{definition.name}[/] → {image_store.root}")
    try:
        result = build(definition, image_store, cache=cache, ccache=CompilerCache(cache_dir), progress=progress)
    finally:
        progress.close()
    if as_json:
        emit_json(result.as_dict())
    else:
        err.print(
            f"published [bold]{result.image.name} {result.image.version}[/] in {result.seconds:.0f} s "
            f"(rootfs {result.rootfs_bytes / 2**20:.0f} MiB, squashfs {result.squashfs_bytes / 2**20:.0f} MiB)"
        )
        click.echo(result.image.path)


def _version_row(item: ImageVersion) -> dict[str, Any]:
    data = item.as_dict()
    try:
        manifest = item.read_manifest()
    except ImageError:
        manifest = {}
    data["kernel_version"] = (manifest.get("kernel") or {}).get("version")
    data["built_at"] = manifest.get("built_at")
    data["squashfs_bytes"] = (manifest.get("sizes") or {}).get("squashfs_bytes")
    return data


@image.command("list")
@store_option
@json_output
@pass_app
def list_cmd(app: AppContext, store: Path | None, as_json: bool) -> None:
    """Published images and their versions."""
    image_store = _store(app, store)
    rows = [_version_row(v) for name in image_store.names() for v in image_store.versions(name)]
    if as_json:
        emit_json(rows)
        return
    table = Table("image", "version", "current", "kernel", "squashfs", "built")
    for row in rows:
        size = f"{row['squashfs_bytes'] / 2**20:.0f} MiB" if row["squashfs_bytes"] else "?"
        table.add_row(
            row["name"], row["version"], "*" if row["current"] else "", row["kernel_version"] or "?", size,
            row["built_at"] or "?",
        )  # fmt: skip
    Console().print(table) if rows else err.print(f"no images in {image_store.root}")


@image.command("show")
@click.argument("name")
@click.option("--version", "version", help="A version (default: current).")
@store_option
@json_output
@pass_app
def show_cmd(app: AppContext, name: str, version: str | None, store: Path | None, as_json: bool) -> None:
    """The manifest of an image version."""
    image_store = _store(app, store)
    item = image_store.get(name, version) if version else image_store.current(name)
    manifest = item.read_manifest()
    if as_json:
        emit_json({**item.as_dict(), "manifest": manifest})
        return
    console = Console()
    console.print(f"[bold]{name} {item.version}[/]{' (current)' if item.is_current else ''}  {item.path}")
    console.print(f"  distro   {manifest.get('distro')} {manifest.get('release')}")
    kernel = manifest.get("kernel", {})
    console.print(f"  kernel   {kernel.get('version', '?')}  cmdline: {kernel.get('cmdline', '')}", markup=False)
    roles = ", ".join(
        f"{r.get('name', '?')}@{str(r.get('revision') or 'unknown')[:10]}"
        for r in _list_of_dicts(manifest.get("roles"))
    )
    console.print(f"  roles    {roles}", markup=False)
    packages = manifest.get("packages")
    console.print(f"  packages {len(packages) if isinstance(packages, list) else '?'}")
    for filename, entry in manifest.get("artefacts", {}).items():
        size, digest = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        mib = f"{size / 2**20:8.1f}" if isinstance(size, int | float) else "       ?"
        console.print(f"  {filename:<16} {mib} MiB  sha256:{str(digest)[:16]}…", markup=False)
    stages = ", ".join(
        f"{k} {v:.0f}s" if isinstance(v, int | float) else f"{k} ?" for k, v in manifest.get("stages", {}).items()
    )
    console.print(f"  stages   {stages}", markup=False)


def _list_of_dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


@image.command("rollback")
@click.argument("name")
@click.option("--to", "to", help="Roll back to this version (default: the one before current).")
@store_option
@json_output
@pass_app
def rollback_cmd(app: AppContext, name: str, to: str | None, store: Path | None, as_json: bool) -> None:
    """Point NAME's current at the previous version."""
    item = _store(app, store).rollback(name, to)
    if as_json:
        emit_json(item.as_dict())
    else:
        err.print(f"{name}: current is now {item.version}")


@image.command("rm")
@click.argument("name")
@click.argument("version")
@store_option
@pass_app
def rm_cmd(app: AppContext, name: str, version: str, store: Path | None) -> None:
    """Remove one version (never the current one)."""
    _store(app, store).remove(name, version)
    err.print(f"{name}: removed {version}")


@image.command("validate")
@click.argument("names", nargs=-1)
@pass_app
def validate_cmd(app: AppContext, names: tuple[str, ...]) -> None:
    """Check image definitions (default: all known)."""
    from provision.catalog import known_images

    site = _site(app)
    for name in names or sorted(known_images(site.settings.images_dir if site is not None else None)):
        loaded = _definition(app, name)
        err.print(f"{loaded.name}: ok ({loaded.distro.value} {loaded.release}, roles: {', '.join(loaded.roles)})")


@image.command("publish")
@click.argument("name")
@click.option("--version", "version", help="The version to publish (default: the store's current).")
@click.option(
    "--to",
    "backend",
    type=click.Choice([b.value for b in BackendName]),
    help="Boot backend (default: the inventory's provision_boot_backend).",
)
@click.option("--activate", is_flag=True, help="Built-in backend: nodes boot this version from their next boot on.")
@store_option
@dry_run
@json_output
@pass_app
def publish_cmd(
    app: AppContext,
    name: str,
    version: str | None,
    backend: str | None,
    activate: bool,
    store: Path | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Make image NAME bootable on the site's boot backend.

    \b
    builtin: the version becomes servable; nodes boot it only with --activate
             (the first version of an image is active at once), and the
             previous one stays servable (`provision boot activate` rolls back).
    grendel: the files are copied into Grendel's repo_dir (atomically) and the
             image is registered through its API.
    """
    from provision.boot.publish import publish

    result = publish(
        app.site, _store(app, store), name, version=version, to=backend, activate=activate, dry_run=dry_run
    )
    if as_json:
        emit_json(result.as_dict() | {"dry_run": dry_run})
        return
    verb = "would publish" if dry_run else "published"
    state = "active" if result.activated else "servable, not active (use --activate)"
    click.echo(f"{verb} {result.name} {result.version} to {result.backend} ({result.where}): {state}")
