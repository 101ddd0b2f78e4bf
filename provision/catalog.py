"""Where the project's own files live, and which image definitions exist.

One lookup for every module: the package's data directory ``provision/_data``
(image definitions, roles, playbooks, requirements.yml), found through
``importlib.resources``. In a source checkout (editable install) its entries
are symlinks to the top-level ``images/``, ``roles/`` and ``playbooks/``; in a
wheel they are copies (setuptools follows the links when it collects the
package data), so an installed ``provision`` needs no checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _package_dir() -> Path:
    root = resources.files("provision")
    if not isinstance(root, Path):  # a zipped install: ansible-runner needs real files
        raise ImportError(f"provision must be installed as files, not from an archive ({root})")
    return root


PACKAGE_DIR = _package_dir()
DATA_DIR = PACKAGE_DIR / "_data"
IMAGES_DIR = DATA_DIR / "images"
PLAYBOOKS_DIR = DATA_DIR / "playbooks"
ROLES_DIR = DATA_DIR / "roles"
REQUIREMENTS_FILE = DATA_DIR / "requirements.yml"
JOIN_PLAYBOOK = PLAYBOOKS_DIR / "join.yml"
# What must be on PYTHONPATH for `python -m provision...` in a child process.
IMPORT_ROOT = PACKAGE_DIR.parent
# The source checkout the roles come from (git revisions in image manifests); None when installed.
SOURCE_CHECKOUT: Path | None = ROLES_DIR.resolve().parent if ROLES_DIR.is_symlink() else None


def image_dirs(site_images_dir: Path | None = None) -> list[Path]:
    """Directories searched for image definitions; the site's first."""
    dirs = [site_images_dir] if site_images_dir else []
    return [*dirs, IMAGES_DIR]


def known_images(site_images_dir: Path | None = None) -> frozenset[str]:
    """Names of the image definitions (``images/NAME.yml``)."""
    return frozenset(p.stem for d in image_dirs(site_images_dir) if d.is_dir() for p in d.glob("*.yml"))
