"""``provision image build``: bootstrap, roles, initramfs, scan, squashfs, manifest, publish.

Each stage is a step reported to a ``Progress`` (the CLI draws it with rich;
the library never prints). Mounts live only inside ``Chroot`` blocks, the
staging directory only inside ``ImageStore.staging``; SIGTERM, SIGHUP and
SIGINT become an exception (or, while Ansible runs, a cancellation that
ansible-runner turns into killing the playbook's process group), so every
exit path unmounts and removes the staging tree, and ``current`` moves only
after a complete, verified version has been renamed into the store.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from provision import proc
from provision.ansible import PlaybookError, TaskEvent, run_playbook
from provision.catalog import PLAYBOOKS_DIR, ROLES_DIR
from provision.errors import CommandError, ImageError
from provision.image import kernel, manifest, scan, squashfs
from provision.image.cache import BootstrapCache
from provision.image.ccache import CompilerCache
from provision.image.chroot import Chroot, require_root
from provision.image.definition import ImageDefinition
from provision.image.distro import for_definition
from provision.image.rootfs import RootOverlay
from provision.image.store import ImageStore, ImageVersion

IMAGE_PLAYBOOK = PLAYBOOKS_DIR / "image.yml"


class Stage(StrEnum):
    BOOTSTRAP = "bootstrap"
    ROLES = "roles"
    INITRAMFS = "initramfs"
    SCAN = "scan"
    SQUASHFS = "squashfs"
    MANIFEST = "manifest"
    PUBLISH = "publish"


STAGE_TITLES = {
    Stage.BOOTSTRAP: "bootstrap the root filesystem",
    Stage.ROLES: "apply the roles (Ansible, chroot)",
    Stage.INITRAMFS: "kernel and initramfs (dracut, in the image)",
    Stage.SCAN: "scan for secrets",
    Stage.SQUASHFS: "pack the squashfs",
    Stage.MANIFEST: "write the manifest",
    Stage.PUBLISH: "publish into the store",
}


class Progress(Protocol):
    def stage_started(self, stage: Stage, title: str) -> None: ...
    def stage_finished(self, stage: Stage, seconds: float, detail: str) -> None: ...
    def message(self, text: str) -> None: ...
    def task(self, event: TaskEvent) -> None: ...


class NullProgress:
    def stage_started(self, stage: Stage, title: str) -> None:
        pass

    def stage_finished(self, stage: Stage, seconds: float, detail: str) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def task(self, event: TaskEvent) -> None:
        pass


class BuildInterrupted(ImageError):
    """A signal stopped the build; nothing was published."""


@dataclass(frozen=True)
class BuildResult:
    image: ImageVersion
    stages: Mapping[str, float]
    cache_hit: bool
    cache_key: str
    rootfs_bytes: int
    squashfs_bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.image.as_dict(),
            "stages": dict(self.stages),
            "bootstrap_cache_hit": self.cache_hit,
            "bootstrap_cache_key": self.cache_key,
            "rootfs_bytes": self.rootfs_bytes,
            "squashfs_bytes": self.squashfs_bytes,
            "seconds": round(self.seconds, 1),
        }


@dataclass
class _Run:
    """Mutable state of one build (kept apart from the frozen definition)."""

    progress: Progress
    stages: dict[str, float] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    in_ansible: bool = False
    signal_name: str = ""

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[list[str]]:
        self.progress.stage_started(stage, STAGE_TITLES[stage])
        detail: list[str] = []
        start = time.monotonic()
        yield detail
        elapsed = time.monotonic() - start
        self.stages[stage.value] = elapsed
        self.progress.stage_finished(stage, elapsed, " ".join(detail))


@contextmanager
def _signals_raise(run: _Run) -> Iterator[None]:
    """SIGTERM/SIGHUP/SIGINT: cancel Ansible if it runs, else raise BuildInterrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        run.signal_name = signal.Signals(signum).name
        run.cancel.set()
        if not run.in_ansible:
            raise BuildInterrupted(f"build interrupted by {run.signal_name}; nothing was published")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def extravars_for(definition: ImageDefinition, ccache_dir: str = "") -> dict[str, Any]:
    """The build's own variables (extra vars: nothing may override them)."""
    return {
        "provision_image_build": True,
        "provision_image_name": definition.name,
        "provision_image_roles": list(definition.roles),
        # The compiler cache inside the chroot (roles that compile use it), or "".
        "provision_image_ccache_dir": ccache_dir,
    }


def hostvars_for(definition: ImageDefinition, root: Path) -> dict[str, Any]:
    """The image host's variables: role variables (the definition's win over the initramfs
    section's), then the chroot connection, which no definition can change (their
    ``ansible_*`` variables are refused when the definition is read)."""
    return {
        "stateless_dracut_modules": list(definition.initramfs.modules),
        "stateless_dracut_drivers": list(definition.initramfs.drivers),
        "stateless_dracut_compress": definition.initramfs.compression.value,
        **dict(definition.variables),
        "ansible_connection": "community.general.chroot",
        "ansible_host": str(root),
        "ansible_python_interpreter": "/usr/bin/python3",
    }


def plan(definition: ImageDefinition, store: ImageStore, cache: BootstrapCache) -> dict[str, Any]:
    """What a build would do (``--dry-run``): changes nothing."""
    bootstrapper = for_definition(definition)
    try:
        key: str | None = cache.key(definition, bootstrapper)
        tool_problem = None
    except CommandError as exc:  # the build would fail here; a plan still shows the rest
        key, tool_problem = None, exc.message
    return {
        "name": definition.name,
        "distro": definition.distro.value,
        "release": definition.release,
        "bootstrap": {
            "tool": bootstrapper.tool,
            "cache_key": key,
            "cache_hit": key is not None and (cache.root / key / "usr").is_dir(),
            "tool_problem": tool_problem,
            "packages": len(definition.packages),
        },
        "roles": list(definition.roles),
        "store": str(store.root),
        "current": store.current(definition.name).version if store.versions(definition.name) else None,
        "stages": [s.value for s in Stage],
    }


def _apply_roles(definition: ImageDefinition, root: Path, run: _Run, ccache_dir: str) -> str:
    bootstrapper = for_definition(definition)
    undo = bootstrapper.block_services(root)
    try:
        run.in_ansible = True
        if run.cancel.is_set():
            raise BuildInterrupted(f"build interrupted by {run.signal_name}; nothing was published")
        result = run_playbook(
            IMAGE_PLAYBOOK,
            inventory={"all": {"hosts": {"image": hostvars_for(definition, root)}}},
            extravars=extravars_for(definition, ccache_dir),
            envvars={"ANSIBLE_PIPELINING": "1"},
            roles_path=[ROLES_DIR],
            on_event=run.progress.task,
            cancel=run.cancel.is_set,
        )
    except PlaybookError as exc:
        if run.cancel.is_set():
            raise BuildInterrupted(f"build interrupted by {run.signal_name}; nothing was published") from exc
        raise ImageError(f"image {definition.name}: {exc.message}", hint=exc.hint) from exc
    finally:
        run.in_ansible = False
        undo()
    return f"{result.tasks} tasks, {result.changed} changed"


def _remove_build_leftovers(root: Path) -> None:
    """What the build itself left in the tree (Ansible's remote temp directory)."""
    proc.run(["rm", "-rf", "--one-file-system", root / "root/.ansible"])


def build(
    definition: ImageDefinition,
    store: ImageStore,
    *,
    cache: BootstrapCache | None = None,
    ccache: CompilerCache | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Build definition and publish it as a new version in store."""
    require_root()
    run = _Run(progress=progress or NullProgress())
    cache = cache or BootstrapCache()
    ccache = ccache or CompilerCache()
    bootstrapper = for_definition(definition)
    started = time.monotonic()
    with _signals_raise(run):
        for stale in store.clean_stale():
            run.progress.message(f"removed a stale build directory {stale.name}")
        with store.staging(definition.name) as staging, ExitStack() as mounted:
            out = staging.out
            with run.stage(Stage.BOOTSTRAP) as detail:
                entry = cache.get_or_build(definition, bootstrapper, run.progress.message)
                overlay = RootOverlay(entry.tree, staging.path)
                root = mounted.enter_context(overlay)
                detail.append(f"cache {'hit' if entry.hit else 'miss'} {entry.key[:12]} ({overlay.mode})")

            with Chroot(root) as chroot:
                with run.stage(Stage.ROLES) as detail, ccache.mounted(root) as ccache_dir:
                    before = ccache.size_bytes()
                    detail.append(_apply_roles(definition, root, run, ccache_dir))
                    detail.append(f"(ccache {before / 2**20:.0f} -> {ccache.size_bytes() / 2**20:.0f} MiB)")
                with run.stage(Stage.INITRAMFS) as detail:
                    kver = kernel.kernel_version(root)
                    kernel.build_initramfs(chroot, definition, kver, out)
                    detail.append(f"kernel {kver}")
            _remove_build_leftovers(root)

            with run.stage(Stage.SCAN) as detail:
                # The tree and the initramfs dracut just made (served to anyone, like the squashfs).
                scan.require_clean(root, out / "initrd.img", workdir=staging.path)
                detail.append("clean (rootfs and initramfs)")

            # The version is chosen now so that the image can name itself (/etc/provision-release).
            version = store.new_version(definition.name)
            manifest.write_release(root, definition.name, version)
            packages = bootstrapper.packages(root)
            rootfs_bytes = squashfs.tree_size(root)
            with run.stage(Stage.SQUASHFS) as detail:
                squashfs.pack(root, out / "rootfs.squashfs", definition)
                squashfs_bytes = (out / "rootfs.squashfs").stat().st_size
                detail.append(f"{rootfs_bytes / 2**20:.0f} MiB -> {squashfs_bytes / 2**20:.0f} MiB")
            mounted.close()  # the overlay goes before the version is published

            with run.stage(Stage.MANIFEST) as detail:
                data = manifest.build_manifest(
                    definition=definition,
                    version=version,
                    kernel_version=kver,
                    cmdline=kernel.cmdline(definition),
                    packages=packages,
                    out_dir=out,
                    stages=run.stages,
                    bootstrap={"tool": bootstrapper.tool, "cache_key": entry.key, "cache_hit": entry.hit},
                    sizes={"rootfs_bytes": rootfs_bytes, "squashfs_bytes": squashfs_bytes},
                )
                manifest.write(out, data)
                detail.append(f"{len(packages)} packages")

            with run.stage(Stage.PUBLISH) as detail:
                image = store.publish(staging, version, keep=definition.keep_versions)
                detail.append(f"{definition.name} {version}")

    return BuildResult(
        image=image,
        stages=dict(run.stages),
        cache_hit=entry.hit,
        cache_key=entry.key,
        rootfs_bytes=rootfs_bytes,
        squashfs_bytes=squashfs_bytes,
        seconds=time.monotonic() - started,
    )
