"""Broken and hostile input through the real CLI: one clean refusal each, nothing touched.

The cases come from tests/bad_inputs.py (by category: inventories, site
settings, node and BMC fields, image definitions, CLI arguments, state files,
boot logs). Each runs ``python -m provision`` in a subprocess inside its own
directory beside a sentinel directory; two run at a time. A refusal is exit 1
(2 for a click usage error), exactly one ``error:`` line, at most one
``hint:`` line and no traceback; every file in the case directory and the
sentinel is unchanged afterwards, except what the case's command owns.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bad_inputs import Case, all_cases

pytestmark = pytest.mark.integration

CASES = all_cases()
WORKERS = 2


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    sentinel_before: dict[str, str]
    sentinel_after: dict[str, str]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root: kind, mode and content hash (symlinks by target, not followed)."""
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if path.is_symlink():
                seen[rel] = f"link {os.readlink(path)}"
            elif path.is_dir():
                seen[rel] = f"dir {st.st_mode:o}"
            else:
                seen[rel] = f"file {st.st_mode:o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return seen


def lay_out(case: Case, root: Path) -> None:
    for rel, content in case.files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for rel, target in case.symlinks.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target)


def run_case(case: Case, base: Path) -> Outcome:
    root = base / case.id.replace("/", "_")
    sentinel = base / f"{root.name}.sentinel"
    (sentinel / "victim").mkdir(parents=True)
    (sentinel / "victim" / "keep").write_text("outside everything")
    root.mkdir()
    lay_out(case, root)
    before, sentinel_before = snapshot(root), snapshot(sentinel)
    env = {
        **os.environ,
        "PROVISION_INVENTORY": "inv",
        "PROVISION_BMC_PASSWORD": "not-used",
        "HOME": str(base / f"{root.name}.home"),  # Ansible's ~/.ansible/tmp: not the case's business
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for key in ("ANSIBLE_VAULT_PASSWORD_FILE", "PROVISION_STATE_DIR", "PROVISION_CACHE_DIR"):
        env.pop(key, None)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "provision", *case.args],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired:
        code, stdout, stderr = -1, "", "timed out after 120 s"  # this case fails, the others still run
    return Outcome(code, stdout, stderr, before, snapshot(root), sentinel_before, snapshot(sentinel))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    base = tmp_path_factory.mktemp("bad-input")
    with ThreadPoolExecutor(WORKERS) as pool:
        results = dict(zip([c.id for c in CASES], pool.map(lambda c: run_case(c, base), CASES), strict=True))
    yield results


def test_enough_cases_in_every_category() -> None:
    counts = Counter(c.category for c in CASES)
    print("\nbad-input cases by category: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    assert sum(counts.values()) >= 300
    assert set(counts) == {
        "inventory",
        "site settings",
        "node fields",
        "BMC fields",
        "image definitions",
        "CLI arguments",
        "state files",
        "boot logs",
    }


def _changed(before: dict[str, str], after: dict[str, str], owned: tuple[str, ...]) -> list[str]:
    paths = set(before) | set(after)
    return sorted(
        p for p in paths if before.get(p) != after.get(p) and not any(p == o or p.startswith(o + "/") for o in owned)
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes: dict[str, Outcome]) -> None:
    out = outcomes[case.id]
    report = f"exit {out.returncode}\nstdout:\n{out.stdout[-1500:]}\nstderr:\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr + out.stdout, report
    lines = out.stderr.splitlines()
    errors = [line for line in lines if line.lower().startswith("error:")]
    hints = [line for line in lines if line.startswith("hint:")]
    assert out.returncode == case.expect_exit, report
    if case.expect_exit == 0:
        assert errors == [], report
    else:
        assert len(errors) == 1, report
        assert "internal error" not in errors[0], report
        assert len(hints) <= 1, report
    assert _changed(out.before, out.after, case.owned) == [], report
    assert out.sentinel_before == out.sentinel_after, report
