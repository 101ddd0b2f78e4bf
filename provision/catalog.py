"""Where the project's own files live, and which image definitions exist."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
IMAGES_DIR = PROJECT_ROOT / "images"
PLAYBOOKS_DIR = PROJECT_ROOT / "playbooks"
ROLES_DIR = PROJECT_ROOT / "roles"


def image_dirs(site_images_dir: Path | None = None) -> list[Path]:
    """Directories searched for image definitions; the site's first."""
    dirs = [site_images_dir] if site_images_dir else []
    return [*dirs, IMAGES_DIR]


def known_images(site_images_dir: Path | None = None) -> frozenset[str]:
    """Names of the image definitions (``images/NAME.yml``)."""
    return frozenset(p.stem for d in image_dirs(site_images_dir) if d.is_dir() for p in d.glob("*.yml"))
