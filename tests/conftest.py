"""Shared test configuration. Area-specific fixtures live beside their tests."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from provision.image.store import ImageStore, ImageVersion

F = TypeVar("F", bound=Callable[..., Any])
PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_INVENTORY = PROJECT_ROOT / "inventory" / "example"
_OWN_BASETEMP = pytest.StashKey[Path]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Each session's temporary directories in a base of their own (unless --basetemp names one): pytest makes
    its shared /tmp/pytest-of-USER 0700 whenever another session starts, and the boot servers' unprivileged
    workers could then no longer reach a running test's web root. Kept when a test fails."""
    if config.option.basetemp is None:
        base = Path(tempfile.mkdtemp(prefix="provision-tests-"))
        config.stash[_OWN_BASETEMP] = base
        config.option.basetemp = str(base)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    base = session.config.stash.get(_OWN_BASETEMP, None)
    if base is not None and exitstatus == 0:
        shutil.rmtree(base, ignore_errors=True)


def requires(available: bool, why: str) -> Callable[[F], F]:
    """A prerequisite the suite installs (./run setup) or has (root): missing, the test fails, never skips."""

    def decorate(test: F) -> F:
        @functools.wraps(test)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if not available:
                pytest.fail(f"missing prerequisite: {why}")
            return test(*args, **kwargs)

        return cast(F, checked)

    return decorate


def run_provision(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess (exit code, stdout and stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "provision", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=timeout,
    )


@pytest.fixture
def example_inventory() -> Path:
    return EXAMPLE_INVENTORY


# --- Images: build base-debian12 once per test run and share it -----------------
# The build goes through the real CLI (`provision image build base-debian12
# --store <session store>`); the bootstrap cache ($PROVISION_CACHE_DIR or
# ~/.cache/provision) is keyed by its inputs, so a later build in the same run
# (or the next run) reuses the bootstrapped tree.
BASE_IMAGE = "base-debian12"


# Source tarballs the GPU image builds (Enroot, Pyxis): ../shared/vendor beside
# the checkout (beside the main checkout for a git worktree) when this machine
# has it, else the roles' default, GitHub's release tarballs (same pinned
# checksums). An explicit $PROVISION_SOURCE_MIRROR wins.
def _source_mirror() -> Path | None:
    roots = [PROJECT_ROOT]
    dot_git = PROJECT_ROOT / ".git"
    if dot_git.is_file():  # a worktree: .git names <main>/.git/worktrees/<name>
        gitdir = Path(dot_git.read_text().removeprefix("gitdir:").strip())
        roots.append(gitdir.parent.parent.parent)
    return next((d for r in roots if (d := r.parent / "shared" / "vendor").is_dir()), None)


if (VENDOR_DIR := _source_mirror()) is not None:
    os.environ.setdefault("PROVISION_SOURCE_MIRROR", VENDOR_DIR.resolve().as_uri())


@pytest.fixture(scope="session")
def image_store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image-store")


def build_image(name: str, store: Path) -> dict[str, Any]:
    """Build and publish image NAME through the real CLI; its --json report."""
    if os.geteuid() != 0:
        pytest.fail("image builds need root (mmdebstrap, chroot, mounts); the suite runs as root in CI")
    result = subprocess.run(
        [sys.executable, "-m", "provision", "image", "build", name, "--store", str(store), "--json"],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"provision image build {name} failed:\n{result.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(result.stdout)
    report["stderr"] = result.stderr
    return report


def published(name: str, report: dict[str, Any], store: Path) -> ImageVersion:
    """The version a build report names, from the store, its checksums verified."""
    image = ImageStore(store).get(name, report["version"])
    image.verify()
    return image


@pytest.fixture(scope="session")
def base_image_build(image_store_dir: Path) -> dict[str, Any]:
    """The --json report of the one real build of base-debian12 in this run."""
    return build_image(BASE_IMAGE, image_store_dir)


@pytest.fixture(scope="session")
def base_image(base_image_build: dict[str, Any], image_store_dir: Path) -> ImageVersion:
    """The published base-debian12 (ImageVersion: .kernel, .initrd, .squashfs, .manifest)."""
    return published(BASE_IMAGE, base_image_build, image_store_dir)


COMPUTE_IMAGE = "compute-debian12"


@pytest.fixture(scope="session")
def compute_image(image_store_dir: Path) -> ImageVersion:
    """compute-debian12 with every compute role, built once per run."""
    return published(COMPUTE_IMAGE, build_image(COMPUTE_IMAGE, image_store_dir), image_store_dir)


GPU_IMAGE = "compute-gpu-debian12"


@pytest.fixture(scope="session")
def gpu_image_build(image_store_dir: Path) -> dict[str, Any]:
    """The --json report of the one real build of compute-gpu-debian12 in this run (its stderr included)."""
    return build_image(GPU_IMAGE, image_store_dir)


@pytest.fixture(scope="session")
def gpu_image(gpu_image_build: dict[str, Any], image_store_dir: Path) -> ImageVersion:
    """compute-gpu-debian12: compute-debian12 plus the NVIDIA driver, Enroot and Pyxis installed."""
    return published(GPU_IMAGE, gpu_image_build, image_store_dir)


@contextmanager
def mounted_squashfs(squashfs: Path, mountpoint: Path) -> Iterator[Path]:
    """A published squashfs mounted read-only; unmounted (and checked) after."""
    from provision.image.chroot import mounts_under

    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(squashfs), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
        assert mounts_under(mountpoint) == []


@pytest.fixture(scope="session")
def shared_rack(compute_image: ImageVersion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The run's one 3-node virtual rack on compute-debian12 (tests/vmlab.py), for the scenarios that share it;
    ``lab down`` at the end of the run must leave nothing behind."""
    from image_versions import private_store
    from vmlab import SharedRack

    # Outside pytest's base directory (a --basetemp may name one another session resets to 0700, and the boot
    # server's unprivileged workers could no longer reach the rack's web root). In the same temporary
    # directory as pytest's (one filesystem: the private store is hard links).
    root = Path(tempfile.mkdtemp(prefix="provision-rack-"))
    root.chmod(0o755)
    # A store of its own (hard links): the versions the rollout scenarios derive never become the run's current.
    rack = SharedRack(root, private_store(compute_image, root / "store").root)
    try:
        yield rack
    finally:
        rack.down()
        shutil.rmtree(root)
