"""Image definitions: the shipped ones load; bad ones fail with one line naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from provision.catalog import IMAGES_DIR
from provision.errors import ImageError
from provision.image import definition
from provision.image.definition import Distro, DistroFamily, SquashfsCompression

GOOD: dict[str, Any] = {
    "distro": "debian",
    "release": "bookworm",
    "mirrors": {"debian": "http://deb.debian.org/debian"},
    "packages": ["linux-image-amd64", "systemd", "dracut"],
    "roles": ["stateless", "storage_layout"],
}


def write(tmp_path: Path, data: Any, name: str = "img") -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def load_error(tmp_path: Path, data: Any, name: str = "img") -> ImageError:
    with pytest.raises(ImageError) as info:
        definition.load(write(tmp_path, data, name))
    err = info.value
    assert "\n" not in err.message, err.message
    assert err.hint, "every definition error carries a hint for the fix"
    return err


@pytest.mark.parametrize("name", ["base-debian12", "compute-debian12", "compute-gpu-debian12", "compute-rocky9"])
def test_shipped_definitions_load(name: str) -> None:
    loaded = definition.load(name)
    assert loaded.name == name
    assert loaded.roles[0] == "stateless"
    assert "storage_layout" in loaded.roles
    assert "livenet" in loaded.initramfs.modules


def test_rocky_and_debian_differ_only_in_family_data() -> None:
    rocky = definition.load("compute-rocky9")
    debian = definition.load("compute-gpu-debian12")  # the production image's Debian counterpart (GPU stack)
    assert rocky.family is DistroFamily.REDHAT and rocky.release == "9"
    assert debian.family is DistroFamily.DEBIAN and debian.distro is Distro.DEBIAN
    assert rocky.roles == debian.roles
    assert {"baseos", "appstream", "gpgkey"} <= set(rocky.mirrors)


def test_good_definition_and_defaults(tmp_path: Path) -> None:
    loaded = definition.load(write(tmp_path, GOOD))
    assert loaded.squashfs.compression is SquashfsCompression.ZSTD and loaded.squashfs.level == 15
    assert loaded.keep_versions == 3
    assert loaded.components == ("main",)
    with pytest.raises(AttributeError):
        loaded.release = "trixie"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"colour": "blue"}, "colour", "unknown key"),
        ({"distro": "arch"}, "distro", "unknown value"),
        ({"release": "12"}, "release", "not a debian release"),
        ({"mirrors": {"debian": "deb.debian.org/debian"}}, "mirrors.debian", "not a URL"),
        ({"mirrors": {"other": "http://x/debian"}}, "mirrors", "no 'debian' mirror"),
        ({"packages": []}, "packages", "empty"),
        ({"packages": ["systemd", "systemd"]}, "packages", "listed twice"),
        ({"packages": "systemd"}, "packages", "expected a list"),
        ({"roles": ["storage_layout"]}, "roles", "stateless role is missing"),
        ({"roles": ["stateless", "no_such_role"]}, "roles", "'no_such_role' not found"),
        ({"roles": ["stateless", "Bad-Name"]}, "roles[1]", "not valid"),
        ({"vars": ["a", "b"]}, "vars", "expected a mapping"),
        ({"vars": {"1bad": 1}}, "vars", "not valid"),
        ({"vars": {"ansible_connection": "local"}}, "vars", "ansible_connection is reserved"),
        ({"vars": {"ansible_host": "/"}}, "vars", "ansible_host is reserved"),
        ({"vars": {"provision_image_build": False}}, "vars", "provision_image_build is reserved"),
        ({"kernel_cmdline": ["root=/dev/sda"]}, "kernel_cmdline", "root= is set by the boot backend"),
        ({"initramfs": {"modules": ["base"]}}, "initramfs.modules", "'livenet' is missing"),
        ({"initramfs": {"compression": "bzip9"}}, "initramfs.compression", "unknown value"),
        ({"initramfs": {"hostonly": True}}, "initramfs.hostonly", "unknown key"),
        ({"squashfs": {"compression": "xz", "level": 9}}, "squashfs.level", "takes no level"),
        ({"squashfs": {"level": 40}}, "squashfs.level", "integer 1..22"),
        ({"squashfs": {"block_size": "big"}}, "squashfs.block_size", "not valid"),
        ({"keep_versions": 0}, "keep_versions", "integer 1..100"),
        ({"name": "other"}, "name", "does not match the file name"),
    ],
)
def test_bad_definitions(tmp_path: Path, change: dict[str, Any], field: str, words: str) -> None:
    err = load_error(tmp_path, {**GOOD, **change})
    assert err.message.startswith(f"image img: {field}:"), err.message
    assert words in err.message


@pytest.mark.parametrize("missing", ["distro", "release", "mirrors", "packages", "roles"])
def test_missing_required_key(tmp_path: Path, missing: str) -> None:
    data = {k: v for k, v in GOOD.items() if k != missing}
    err = load_error(tmp_path, data)
    assert err.message == f"image img: {missing}: missing"
    assert f"add `{missing}:`" in (err.hint or "")


def test_rocky_needs_baseos_and_appstream(tmp_path: Path) -> None:
    err = load_error(tmp_path, {**GOOD, "distro": "rocky", "release": "9"})
    assert "no 'baseos' mirror" in err.message


def test_invalid_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    err = load_error(tmp_path, "distro: [unclosed\n")
    assert "invalid YAML" in err.message and "line" in err.message
    err = load_error(tmp_path, "- just\n- a list\n")
    assert "is not a YAML mapping" in err.message


def test_unknown_image_name_lists_known() -> None:
    with pytest.raises(ImageError) as info:
        definition.load("no-such-image")
    assert "no image definition 'no-such-image'" in info.value.message
    assert "base-debian12" in (info.value.hint or "")


def test_mirror_overrides_for_air_gapped_sites(tmp_path: Path) -> None:
    loaded = definition.load(write(tmp_path, GOOD))
    local = loaded.with_mirrors({"debian": "http://mirror.local/debian/"})
    assert local.mirrors["debian"] == "http://mirror.local/debian"
    assert loaded.mirrors["debian"] == "http://deb.debian.org/debian"
    with pytest.raises(ImageError, match="unknown mirror 'epel'"):
        loaded.with_mirrors({"epel": "http://x/"})


def test_secret_variables_never_public(tmp_path: Path) -> None:
    data = {
        **GOOD,
        "vars": {"munge_key": "x", "wireguard_private_key": "y", "k0s_join_token": "z", "site_pw": "w", "ok": 1},
        "secret_vars": ["site_pw"],
    }
    loaded = definition.load(write(tmp_path, data))
    assert loaded.public_variables() == {"ok": 1}


def test_images_dir_is_the_catalogue() -> None:
    assert {p.stem for p in IMAGES_DIR.glob("*.yml")} >= {"base-debian12", "compute-debian12", "compute-rocky9"}
