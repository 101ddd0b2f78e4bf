"""Debian family: mmdebstrap (apt's solver, so dracut replaces initramfs-tools).

The kernel's postinst would build a generic initrd we never use (~50 MB, a
core busy with gzip -9 for a minute): while bootstrapping, dracut's kernel
hook is diverted and replaced by a no-op, and the diversion is undone at the
end, so the cached tree is exactly Debian's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from provision import proc
from provision.image.definition import DistroFamily, ImageDefinition

_HOOK = "/etc/kernel/postinst.d/dracut"
_DIVERTED = f"{_HOOK}.provision-disabled"  # run-parts ignores names with a dot
_ESSENTIAL_HOOK = (
    f'chroot "$1" dpkg-divert --quiet --local --rename --divert {_DIVERTED} --add {_HOOK}'
    f' && mkdir -p "$1/etc/kernel/postinst.d" && printf "#!/bin/sh\\nexit 0\\n" > "$1{_HOOK}" && chmod 755 "$1{_HOOK}"'
)
_CUSTOMIZE_HOOK = (
    f'rm -f "$1{_HOOK}" && chroot "$1" dpkg-divert --quiet --local --rename --remove {_HOOK}'
    ' && rm -f "$1"/boot/initrd.img-* "$1"/initrd.img "$1"/initrd.img.old'
)
POLICY_RC_D = "/usr/sbin/policy-rc.d"


class Debian:
    family = DistroFamily.DEBIAN
    tool = "mmdebstrap"

    def tool_version(self) -> str:
        out = proc.run([self.tool, "--version"], hint="apt-get install mmdebstrap").stdout.strip()
        return out.splitlines()[0] if out else "unknown"

    def sources(self, definition: ImageDefinition) -> list[str]:
        comps = " ".join(definition.components)
        release = definition.release
        lines = [f"deb {definition.mirrors['debian']} {release} {comps}"]
        lines.append(f"deb {definition.mirrors['debian']} {release}-updates {comps}")
        if "debian_security" in definition.mirrors:
            lines.append(f"deb {definition.mirrors['debian_security']} {release}-security {comps}")
        for key, url in definition.mirrors.items():
            if key not in ("debian", "debian_security"):
                lines.append(f"deb {url} {release} {comps}")
        return lines

    def cache_inputs(self, definition: ImageDefinition) -> dict[str, Any]:
        return {
            "sources": self.sources(definition),
            "packages": sorted(definition.packages),
            "variant": "minbase",
            "hooks": [_ESSENTIAL_HOOK, _CUSTOMIZE_HOOK],
        }

    def bootstrap(self, definition: ImageDefinition, target: Path, workdir: Path, log: Callable[[str], None]) -> None:
        argv = [
            self.tool,
            "--mode=root",
            "--variant=minbase",
            "--format=directory",
            f"--components={','.join(definition.components)}",
            f"--include={','.join(definition.packages)}",
            f"--essential-hook={_ESSENTIAL_HOOK}",
            f"--customize-hook={_CUSTOMIZE_HOOK}",
            definition.release,
            str(target),
            *self.sources(definition),
        ]
        log(f"mmdebstrap {definition.release} ({len(definition.packages)} packages)")
        proc.run(
            argv,
            env={"TMPDIR": str(workdir)},
            timeout=3600,
            hint=f"check that the mirrors of {definition.name} are reachable: {', '.join(definition.mirrors.values())}",
        )

    def packages(self, root: Path) -> list[dict[str, str]]:
        out = proc.run(
            ["chroot", root, "dpkg-query", "-W", "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"]
        ).stdout
        result = []
        for line in out.splitlines():
            status, name, version, arch = ([*line.split("\t"), "", "", "", ""])[:4]
            if status.strip() == "ii":
                result.append({"name": name, "version": version, "arch": arch})
        return sorted(result, key=lambda p: p["name"])

    def block_services(self, root: Path) -> Callable[[], None]:
        """policy-rc.d exit 101: invoke-rc.d/deb-systemd-invoke start nothing."""
        policy = root / POLICY_RC_D.lstrip("/")
        existed = policy.exists()
        if not existed:
            policy.write_text("#!/bin/sh\n# provision image build: never start services in the chroot\nexit 101\n")
            policy.chmod(0o755)

        def undo() -> None:
            if not existed:
                policy.unlink(missing_ok=True)

        return undo
