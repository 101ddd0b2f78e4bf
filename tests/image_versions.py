"""New versions of a built image without another build (a rollout needs an A, a B and a broken C).

A build takes minutes and the suite builds each image once; a version here
is the built one's root filesystem, unpacked, given its own
``/etc/provision-release`` (and, for a broken version, a slurmd that cannot
start), packed again with the image's squashfs options and published
through the store's own staging and publish (manifest hashes verified).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from provision.image.manifest import write_release
from provision.image.store import ARTEFACTS, MANIFEST, ImageStore, ImageVersion, sha256_file

#: A slurmd that cannot start: what a bad Slurm or driver update does to a node.
BROKEN_SLURMD = "[Service]\nExecStartPre=/bin/false\n"


def private_store(source: ImageVersion, root: Path) -> ImageStore:
    """A store of its own holding ``source`` (hard links: no copy), so derived versions never become
    the shared store's current version."""
    target = root / source.name / source.version
    target.parent.mkdir(parents=True)
    shutil.copytree(source.path, target, copy_function=os.link)
    (root / source.name / "current").symlink_to(source.version)
    return ImageStore(root)


def derive(store: ImageStore, source: ImageVersion, *, broken_slurmd: bool = False) -> ImageVersion:
    """A new version of ``source``'s image in ``store``; ``broken_slurmd``: its slurmd never starts."""
    manifest = json.loads(source.manifest.read_text())
    with store.staging(source.name) as staging:
        root = staging.path / "root"
        subprocess.run(["unsquashfs", "-q", "-n", "-d", str(root), str(source.squashfs)], check=True)
        version = store.new_version(source.name)
        write_release(root, source.name, version)
        if broken_slurmd:
            dropin = root / "etc/systemd/system/slurmd.service.d"
            dropin.mkdir(parents=True, exist_ok=True)
            (dropin / "broken.conf").write_text(BROKEN_SLURMD)
        squashfs = manifest.get("squashfs", {})
        # zstd at level 3: the same format, packed in a fraction of the build's time (level 15 by default).
        args = ["-comp", "zstd", "-Xcompression-level", "3", "-b", str(squashfs.get("block_size", "1M"))]
        subprocess.run(["mksquashfs", str(root), str(staging.out / ARTEFACTS["squashfs"]), "-noappend", "-xattrs",
                        "-no-progress", "-quiet", *args], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        for key in ("kernel", "initrd"):
            shutil.copyfile(getattr(source, key), staging.out / ARTEFACTS[key])
        for name in ARTEFACTS.values():
            path = staging.out / name
            path.chmod(0o644)
            manifest["artefacts"][name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        manifest.update(version=version, derived_from=source.version, broken_slurmd=broken_slurmd)
        (staging.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return store.publish(staging, version, keep=10)
