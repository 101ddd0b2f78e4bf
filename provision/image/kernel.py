"""Kernel and initramfs: built for the image's kernel, inside the image.

dracut runs in the chroot (the image's dracut, its modules, its kernel
modules), never the host's, with the modules that fetch a squashfs root over
HTTP and run it from RAM (``livenet``, ``dmsquash-live``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from provision.errors import ImageError
from provision.image.chroot import Chroot
from provision.image.definition import ImageDefinition

# The arguments the image needs on its kernel command line besides root=.
BASE_CMDLINE = ("rd.live.overlay.overlayfs=1", "rd.neednet=1", "ip=dhcp", "rd.shell=0", "rd.emergency=reboot")


def _natural(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def kernel_version(root: Path) -> str:
    """The image's kernel (the newest if several are installed)."""
    versions = sorted(
        (p.name for p in (root / "lib/modules").glob("*") if (p / "modules.order").exists()), key=_natural
    )
    if not versions:
        raise ImageError("the image has no kernel (no /lib/modules/*)", hint="add the kernel package to `packages:`")
    return versions[-1]


def kernel_image(root: Path, version: str) -> Path:
    for candidate in (root / f"boot/vmlinuz-{version}", root / f"lib/modules/{version}/vmlinuz"):
        if candidate.is_file():
            return candidate
    raise ImageError(f"no kernel image for {version} in /boot or /lib/modules", hint="reinstall the kernel package")


def build_initramfs(chroot: Chroot, definition: ImageDefinition, version: str, out_dir: Path) -> tuple[Path, Path]:
    """Write out_dir/vmlinuz and out_dir/initrd.img; return both paths."""
    ird = definition.initramfs
    inside = "/var/tmp/provision-initrd.img"
    chroot.run(
        [
            "dracut", "--force", "--no-hostonly", "--no-hostonly-cmdline", "--no-early-microcode",
            "--modules", " ".join(ird.modules),
            "--add-drivers", " ".join(ird.drivers),
            "--compress", ird.compression.value,
            "--kver", version, inside,
        ],
        timeout=1800,
        hint="dracut failed in the image: are dracut, dracut-live and dracut-network in `packages:`?",
    )  # fmt: skip
    built = chroot.root / inside.lstrip("/")
    initrd = out_dir / "initrd.img"
    shutil.move(built, initrd)
    kernel = out_dir / "vmlinuz"
    shutil.copyfile(kernel_image(chroot.root, version), kernel)
    initrd.chmod(0o644)
    kernel.chmod(0o644)
    return kernel, initrd


def cmdline(definition: ImageDefinition) -> str:
    """The kernel command line the image needs, root= excluded (the boot backend adds it)."""
    return " ".join((*BASE_CMDLINE, *definition.kernel_cmdline))
