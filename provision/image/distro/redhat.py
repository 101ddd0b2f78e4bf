"""RedHat family (Rocky Linux): ``dnf --installroot --releasever``.

Repositories come from the definition's mirrors (``baseos``, ``appstream``
and any other name; ``gpgkey`` is the signing key's URL), written into a
private reposdir so that the host's own repositories never leak in, and into
the image (``/etc/yum.repos.d/provision.repo``) so that roles and later
updates use the same, possibly local, mirrors. kernel-install's dracut plugin
is masked while bootstrapping (the generic initrd is never used).

This path cannot be exercised on the build machines of this project (only
Debian's mirror is reachable); it is the same pipeline with another tool.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provision import proc
from provision.errors import ImageError
from provision.image.definition import DistroFamily, ImageDefinition

_MASKED_PLUGINS = ("50-dracut.install", "51-dracut-rescue.install")


class RedHat:
    family = DistroFamily.REDHAT
    tool = "dnf"

    def tool_version(self) -> str:
        out = proc.run([self.tool, "--version"], hint="install dnf on the build host (Debian: apt-get install dnf)")
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"

    def repo_file(self, definition: ImageDefinition) -> str:
        gpgkey = definition.mirrors.get("gpgkey")
        sections = []
        for name, url in definition.mirrors.items():
            if name == "gpgkey":
                continue
            lines = [f"[provision-{name}]", f"name=provision {name}", f"baseurl={url}", "enabled=1"]
            lines += [f"gpgcheck=1\ngpgkey={gpgkey}"] if gpgkey else ["gpgcheck=0"]
            sections.append("\n".join(lines) + "\n")
        return "# Written by provision from the image definition's mirrors.\n" + "\n".join(sections)

    def cache_inputs(self, definition: ImageDefinition) -> dict[str, Any]:
        return {
            "releasever": definition.release,
            "repos": self.repo_file(definition),
            "packages": sorted(definition.packages),
            "masked": list(_MASKED_PLUGINS),
        }

    def bootstrap(self, definition: ImageDefinition, target: Path, workdir: Path, log: Callable[[str], None]) -> None:
        if "gpgkey" not in definition.mirrors:
            raise ImageError(
                f"image {definition.name}: mirrors: no 'gpgkey'",
                hint="add `gpgkey: URL` of the distribution's signing key (a local copy on air-gapped sites)",
            )
        root = target
        reposdir = workdir / "repos"
        shutil.rmtree(root, ignore_errors=True)
        reposdir.mkdir(parents=True, exist_ok=True)
        (reposdir / "provision.repo").write_text(self.repo_file(definition))
        plugins = root / "etc/kernel/install.d"
        plugins.mkdir(parents=True)
        for plugin in _MASKED_PLUGINS:
            (plugins / plugin).symlink_to("/dev/null")
        log(f"dnf --installroot --releasever={definition.release} ({len(definition.packages)} packages)")
        proc.run(
            [
                self.tool, "-y", "--installroot", root, f"--releasever={definition.release}",
                f"--setopt=reposdir={reposdir}", f"--setopt=cachedir={workdir / 'dnf-cache'}",
                "--setopt=install_weak_deps=False", "--setopt=keepcache=False", "--nodocs",
                "install", *definition.packages,
            ],
            timeout=3600,
            hint=f"check that the mirrors of {definition.name} are reachable: {', '.join(definition.mirrors.values())}",
        )  # fmt: skip
        for plugin in _MASKED_PLUGINS:
            (plugins / plugin).unlink(missing_ok=True)
        repos = root / "etc/yum.repos.d"
        repos.mkdir(parents=True, exist_ok=True)
        for stock in repos.glob("*.repo"):
            stock.unlink()
        (repos / "provision.repo").write_text(self.repo_file(definition))
        for initrd in (root / "boot").glob("initramfs-*.img"):
            initrd.unlink()
        shutil.rmtree(root / "var/cache/dnf", ignore_errors=True)

    def packages(self, root: Path) -> list[dict[str, str]]:
        out = proc.run(["chroot", root, "rpm", "-qa", "--qf", "%{NAME}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\t%{ARCH}\n"])
        result = []
        for line in out.stdout.splitlines():
            name, version, arch = ([*line.split("\t"), "", "", ""])[:3]
            result.append({"name": name, "version": version.removeprefix("0:"), "arch": arch})
        return sorted(result, key=lambda p: p["name"])

    def block_services(self, root: Path) -> Callable[[], None]:
        # systemctl refuses to start units in a chroot ("Running in chroot,
        # ignoring request") and RPM scriptlets only enable; nothing to add.
        return lambda: None
