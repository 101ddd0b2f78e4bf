"""Image definitions: ``images/NAME.yml`` read into a frozen, validated value.

A definition names a distribution and release, the mirrors to bootstrap from,
the bootstrap package set, the Ansible roles applied in order with their
variables, the kernel command line extras, and how the initramfs and the
squashfs are packed. Every error is one line naming the field and the fix;
unknown keys are rejected (a typo must not be silently ignored).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from provision.catalog import ROLES_DIR, image_dirs
from provision.errors import ImageError
from provision.image.scan import SECRET_VARIABLE
from provision.names import IMAGE_RULE, is_exact_image_name
from provision.settings import SiteSettings

_PACKAGE = re.compile(r"^[A-Za-z0-9@][A-Za-z0-9.+_:~=*-]*$")
_ROLE = re.compile(r"^[a-z][a-z0-9_]*$")
_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_VAR_PREFIXES = ("ansible_", "provision_")
_MIRROR_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
# Variable names that look secret: never copied into a manifest or a log.
# Variables never recorded in a manifest or log: the secret scan's name rule (``*_pw``, ``apikey``, ``jwt``...).
SECRET_NAME = SECRET_VARIABLE


class Distro(StrEnum):
    DEBIAN = "debian"
    ROCKY = "rocky"

    @property
    def family(self) -> DistroFamily:
        return _FAMILY[self]


class DistroFamily(StrEnum):
    """Ansible's ``ansible_os_family`` spelling, lower-cased."""

    DEBIAN = "debian"
    REDHAT = "redhat"


_FAMILY = {Distro.DEBIAN: DistroFamily.DEBIAN, Distro.ROCKY: DistroFamily.REDHAT}


class SquashfsCompression(StrEnum):
    ZSTD = "zstd"
    XZ = "xz"
    GZIP = "gzip"
    LZ4 = "lz4"
    LZO = "lzo"


class InitrdCompression(StrEnum):
    ZSTD = "zstd"
    GZIP = "gzip"
    XZ = "xz"
    LZ4 = "lz4"
    NONE = "cat"


# dracut modules that fetch a squashfs root over HTTP and run it from RAM.
DEFAULT_DRACUT_MODULES = (
    "systemd",
    "systemd-initrd",
    "dracut-systemd",
    "base",
    "fs-lib",
    "img-lib",
    "udev-rules",
    "network-legacy",
    "network",
    "url-lib",
    "livenet",
    "dmsquash-live",
    "rootfs-block",
    "terminfo",
    "shutdown",
)
DEFAULT_DRACUT_DRIVERS = ("virtio_net", "virtio_pci", "squashfs", "overlay", "loop", "e1000", "e1000e", "igb", "ixgbe")


@dataclass(frozen=True)
class Squashfs:
    compression: SquashfsCompression = SquashfsCompression.ZSTD
    level: int | None = 15
    block_size: str = "1M"

    def mksquashfs_args(self) -> list[str]:
        args = ["-comp", self.compression.value, "-b", self.block_size]
        if self.level is not None and self.compression in (SquashfsCompression.ZSTD, SquashfsCompression.GZIP):
            args += ["-Xcompression-level", str(self.level)]
        return args


@dataclass(frozen=True)
class Initramfs:
    modules: tuple[str, ...] = DEFAULT_DRACUT_MODULES
    drivers: tuple[str, ...] = DEFAULT_DRACUT_DRIVERS
    compression: InitrdCompression = InitrdCompression.ZSTD


@dataclass(frozen=True)
class ImageDefinition:
    """One image: what to bootstrap, which roles to apply, how to pack it."""

    name: str
    path: Path
    distro: Distro
    release: str
    mirrors: Mapping[str, str]
    packages: tuple[str, ...]
    roles: tuple[str, ...]
    description: str = ""
    components: tuple[str, ...] = ("main",)
    variables: Mapping[str, Any] = field(default_factory=dict)
    secret_variables: frozenset[str] = frozenset()
    kernel_cmdline: tuple[str, ...] = ()
    initramfs: Initramfs = Initramfs()
    squashfs: Squashfs = Squashfs()
    keep_versions: int = 3

    @property
    def family(self) -> DistroFamily:
        return self.distro.family

    def is_secret(self, variable: str) -> bool:
        return variable in self.secret_variables or bool(SECRET_NAME.search(variable))

    def public_variables(self) -> dict[str, Any]:
        """The role variables safe to record: secrets (by name or marked) left out."""
        return {k: v for k, v in self.variables.items() if not self.is_secret(k)}

    def with_mirrors(self, overrides: Mapping[str, str]) -> ImageDefinition:
        """The same definition with some mirrors replaced (air-gapped sites)."""
        from dataclasses import replace

        unknown = sorted(set(overrides) - set(self.mirrors))
        if unknown:
            raise ImageError(
                f"{self.name}: provision_mirrors: unknown mirror {unknown[0]!r} (image has: {', '.join(self.mirrors)})",
                hint="override only the mirror names the image definition declares",
            )
        merged = dict(self.mirrors)
        for key, url in overrides.items():
            merged[key] = _url(self.name, f"provision_mirrors.{key}", url)
        return replace(self, mirrors=merged)


_KEYS = {
    "name": "the image name (must match the file name)",
    "description": "one line saying what the image is for",
    "distro": "debian or rocky",
    "release": "bookworm (Debian) or 9 (Rocky)",
    "mirrors": "name: URL of each package mirror",
    "components": "Debian archive components",
    "packages": "the bootstrap package set",
    "roles": "Ansible roles applied in order",
    "vars": "role variables",
    "secret_vars": "variable names never recorded",
    "kernel_cmdline": "extra kernel command line arguments",
    "initramfs": "modules, drivers, compression",
    "squashfs": "compression, level, block_size",
    "keep_versions": "published versions kept in the store",
}
_REQUIRED_MIRRORS = {Distro.DEBIAN: ("debian",), Distro.ROCKY: ("baseos", "appstream")}
_DEFAULT_RELEASE_OK = {Distro.DEBIAN: re.compile(r"^[a-z]+$"), Distro.ROCKY: re.compile(r"^\d+(\.\d+)?$")}


def _fail(image: str, key: str, message: str, fix: str) -> ImageError:
    label = image if is_exact_image_name(image) else repr(image)  # a bad name is quoted, never printed raw
    return ImageError(f"image {label}: {key}: {message}", hint=fix)


def _str(image: str, key: str, value: Any, *, pattern: re.Pattern[str] | None = None, fix: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value).strip() == "":
        raise _fail(image, key, f"expected a non-empty string, got {value!r}", fix or f"set {key} to a string")
    text = str(value).strip()
    if pattern and not pattern.match(text):
        raise _fail(image, key, f"{text!r} is not valid", fix or f"{key} must match {pattern.pattern}")
    return text


def _list(
    image: str, key: str, value: Any, *, pattern: re.Pattern[str] | None = None, fix: str = ""
) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(image, key, f"expected a list, got {type(value).__name__}", fix or f"write {key} as a YAML list")
    items = tuple(_str(image, f"{key}[{i}]", v, pattern=pattern, fix=fix) for i, v in enumerate(value))
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise _fail(image, key, f"{item!r} is listed twice", f"remove the duplicate from {key}")
        seen.add(item)
    return items


def _url(image: str, key: str, value: Any) -> str:
    text = _str(image, key, value)
    if not re.match(r"^(https?|file|ftp)://\S+$", text):
        raise _fail(image, key, f"{text!r} is not a URL", "write an http(s):// or file:// URL of a package mirror")
    return text.rstrip("/")


def _mapping(image: str, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(
            image, key, f"expected a mapping, got {type(value).__name__}", f"write {key} as `name: value` lines"
        )
    return value


def _enum(image: str, key: str, value: Any, enum: type[StrEnum]) -> Any:
    choices = ", ".join(e.value for e in enum)
    try:
        return enum(str(value))
    except ValueError:
        raise _fail(image, key, f"unknown value {value!r}", f"use one of: {choices}") from None


def _int(image: str, key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(image, key, f"expected an integer {low}..{high}, got {value!r}", f"set {key} to {low}..{high}")
    return value


# One kernel argument: ``word`` or ``key=value`` (the value may hold '=' and ','), nothing the
# iPXE script or a shell would read as syntax (spaces, quotes, `||`, `;`, `$`, `#`).
_CMDLINE_WORD = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/@%+-]{0,127}(=[A-Za-z0-9_.,:/@%+=-]{0,255})?$")
# mksquashfs -b: a power of two from 4 KiB to 1 MiB.
_BLOCK_SIZE = re.compile(r"^(\d{1,7})([KM]?)$")


def _block_size(image: str, value: Any) -> str:
    text = _str(image, "squashfs.block_size", value)
    match = _BLOCK_SIZE.match(text)
    size = int(match[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20}[match[2]] if match else 0
    if not (4096 <= size <= 1 << 20 and size & (size - 1) == 0):
        raise _fail(image, "squashfs.block_size", f"{text!r} is not valid", "use a power of two from 4K to 1M, e.g. 1M")
    return text


def _reject_unknown(image: str, where: str, data: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in data:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise _fail(image, f"{prefix}{key}", "unknown key", f"remove it (known keys: {', '.join(allowed)})")


def parse(
    name: str, data: Any, *, path: Path, roles_dirs: Sequence[Path] = (ROLES_DIR,), check_roles: bool = True
) -> ImageDefinition:
    """Validate the YAML of one definition; raise ImageError naming the field."""
    if not is_exact_image_name(name):
        raise _fail(name, "name", f"{name!r} is not a valid image name", IMAGE_RULE)
    if not isinstance(data, dict):
        raise _fail(name, "(file)", f"{path} is not a YAML mapping", "write `distro:`, `release:`, `roles:` … keys")
    _reject_unknown(name, "", data, list(_KEYS))
    if "name" in data and data["name"] != name:
        raise _fail(name, "name", f"{data['name']!r} does not match the file name {path.name}", f"set name: {name}")
    for required in ("distro", "release", "mirrors", "packages", "roles"):
        if required not in data:
            raise _fail(name, required, "missing", f"add `{required}:` ({_KEYS[required]})")
    distro: Distro = _enum(name, "distro", data["distro"], Distro)
    release = _str(name, "release", data["release"])
    if not _DEFAULT_RELEASE_OK[distro].match(release):
        raise _fail(name, "release", f"{release!r} is not a {distro.value} release", f"use {_KEYS['release']}")

    raw_mirrors = _mapping(name, "mirrors", data["mirrors"])
    mirrors: dict[str, str] = {}
    for key, url in raw_mirrors.items():
        _str(name, "mirrors", key, pattern=_MIRROR_KEY, fix="mirror names are lower_snake_case")
        mirrors[str(key)] = _url(name, f"mirrors.{key}", url)
    for needed in _REQUIRED_MIRRORS[distro]:
        if needed not in mirrors:
            raise _fail(name, "mirrors", f"no {needed!r} mirror", f"add `{needed}: URL` under mirrors")

    components = _list(name, "components", data.get("components", ["main"]), pattern=re.compile(r"^[a-z-]+$"))
    packages = _list(name, "packages", data["packages"], pattern=_PACKAGE, fix="write Debian/RPM package names")
    if not packages:
        raise _fail(name, "packages", "empty", "list at least the kernel, systemd and dracut packages")

    roles = _list(name, "roles", data["roles"], pattern=_ROLE, fix="role names are snake_case directories under roles/")
    if "stateless" not in roles:
        raise _fail(name, "roles", "the stateless role is missing", "add `- stateless` to roles (first is best)")
    if check_roles:
        for role in roles:
            if not any((d / role / "tasks").is_dir() for d in roles_dirs):
                where = ", ".join(str(d) for d in roles_dirs)
                raise _fail(name, "roles", f"role {role!r} not found in {where}", f"create roles/{role} or remove it")

    variables = _mapping(name, "vars", data.get("vars"))
    for var in variables:
        _str(name, "vars", var, pattern=_VAR, fix="variable names are identifiers (role-prefixed)")
        if str(var).startswith(_RESERVED_VAR_PREFIXES):
            # ansible_* would change where or as whom the build runs; provision_* belong to the build.
            raise _fail(
                name,
                "vars",
                f"{var} is reserved: image definitions set role variables only",
                "remove it; where and how the build runs is not an image's choice",
            )
    secret_vars = frozenset(_list(name, "secret_vars", data.get("secret_vars"), pattern=_VAR))

    cmdline = _list(
        name,
        "kernel_cmdline",
        data.get("kernel_cmdline"),
        pattern=_CMDLINE_WORD,
        fix="write `key=value` or `word` arguments of letters, digits and . , : / _ + @ % - (no spaces, quotes or shell/iPXE syntax)",
    )
    for arg in cmdline:
        if arg.startswith("root="):
            raise _fail(name, "kernel_cmdline", "root= is set by the boot backend", "remove root= from kernel_cmdline")

    ird = _mapping(name, "initramfs", data.get("initramfs"))
    _reject_unknown(name, "initramfs", ird, ["modules", "drivers", "compression"])
    initramfs = Initramfs(
        modules=_list(name, "initramfs.modules", ird["modules"]) if "modules" in ird else DEFAULT_DRACUT_MODULES,
        drivers=_list(name, "initramfs.drivers", ird["drivers"]) if "drivers" in ird else DEFAULT_DRACUT_DRIVERS,
        compression=_enum(name, "initramfs.compression", ird.get("compression", "zstd"), InitrdCompression),
    )
    for module in ("livenet", "dmsquash-live"):
        if module not in initramfs.modules:
            raise _fail(name, "initramfs.modules", f"{module!r} is missing", f"add {module} (it fetches the root)")

    sq = _mapping(name, "squashfs", data.get("squashfs"))
    _reject_unknown(name, "squashfs", sq, ["compression", "level", "block_size"])
    compression: SquashfsCompression = _enum(
        name, "squashfs.compression", sq.get("compression", "zstd"), SquashfsCompression
    )
    level_raw = sq.get("level", 15 if compression is SquashfsCompression.ZSTD else None)
    level = None
    if level_raw is not None:
        top = {SquashfsCompression.ZSTD: 22, SquashfsCompression.GZIP: 9}.get(compression)
        if top is None:
            raise _fail(name, "squashfs.level", f"{compression.value} takes no level", "remove squashfs.level")
        level = _int(name, "squashfs.level", level_raw, 1, top)
    block = _block_size(name, sq.get("block_size", "1M"))

    return ImageDefinition(
        name=name,
        path=path,
        distro=distro,
        release=release,
        mirrors=mirrors,
        packages=packages,
        roles=roles,
        description=str(data.get("description") or ""),
        components=components,
        variables=dict(variables),
        secret_variables=secret_vars,
        kernel_cmdline=cmdline,
        initramfs=initramfs,
        squashfs=Squashfs(compression=compression, level=level, block_size=block),
        keep_versions=_int(name, "keep_versions", data.get("keep_versions", 3), 1, 100),
    )


def find(name: str, site_images_dir: Path | None = None) -> Path:
    """The file that defines image NAME (the site's images/ first)."""
    if not is_exact_image_name(name):
        raise ImageError(f"image name {name!r} is not valid", hint=IMAGE_RULE)
    for directory in image_dirs(site_images_dir):
        candidate = directory / f"{name}.yml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in image_dirs(site_images_dir) if d.is_dir() for p in d.glob("*.yml")})
    raise ImageError(f"no image definition {name!r}", hint=f"known images: {', '.join(known) or 'none'}")


def for_site(name: str | None, settings: SiteSettings | None) -> ImageDefinition:
    """The definition ``name`` as a site builds it: its images dir searched first, its mirrors applied.

    ``name`` None means the site's ``provision_default_image``.
    """
    if name is None:
        if settings is None or not settings.default_image:
            raise ImageError(
                "no image named and no provision_default_image in the inventory",
                hint="run `provision image build NAME` or set provision_default_image in group_vars/all",
            )
        name = settings.default_image
    definition = load(name, site_images_dir=settings.images_dir if settings else None)
    if settings is not None and settings.mirrors:
        definition = definition.with_mirrors(dict(settings.mirrors))
    return definition


def load(
    name_or_path: str | Path,
    *,
    site_images_dir: Path | None = None,
    roles_dirs: Sequence[Path] = (ROLES_DIR,),
    check_roles: bool = True,
) -> ImageDefinition:
    """Read and validate one definition by name (``images/NAME.yml``) or path."""
    path = Path(name_or_path)
    if path.suffix not in (".yml", ".yaml"):
        path = find(str(name_or_path), site_images_dir)
    name = path.stem
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ImageError(f"image {name}: cannot read {path}: {exc.strerror}", hint="check the path") from exc
    except ValueError as exc:  # UnicodeDecodeError: not a text file
        raise ImageError(f"image {name}: {path} is not UTF-8 text", hint="an image definition is a YAML file") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ImageError(f"image {name}: {path}{where}: invalid YAML", hint="fix the YAML syntax") from exc
    return parse(name, data, path=path, roles_dirs=roles_dirs, check_roles=check_roles)
