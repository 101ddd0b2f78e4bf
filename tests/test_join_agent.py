"""roles/join_agent: the node-side join agent, rendered from the role and run for real.

The script runs with the real curl, ssh-keygen, age and tar against an HTTP
double of the join service written here from the protocol (signatures checked
with `ssh-keygen -Y verify`, bundles encrypted with `age -R` to the node's SSH
key), installing into a scratch root (PROVISION_JOIN_ROOT). The service
itself (provision/service) is tested against this same agent in its own e2e
test; services are not restarted here (--once, or a manifest without any).
"""

from __future__ import annotations

import io
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from conftest import requires
from test_bundle import render, stats, write_inventory

ROOT = Path(__file__).resolve().parent.parent
ROLE = ROOT / "roles" / "join_agent"
BIN = Path(sys.executable).parent
NODE = "node01"
PLAYBOOK = (str(BIN / "ansible-playbook"), "-c", "local", "-i", "localhost,")
VERIFY = ("ssh-keygen", "-Y", "verify", "-f")


def render_agent(dest: Path, **overrides: object) -> tuple[Path, Path]:
    """The role's script and unit, rendered by Ansible with the role's defaults (libexec dir in dest)."""
    dest.mkdir(parents=True, exist_ok=True)
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars_files": [str(ROLE / "defaults" / "main.yml")],
            "tasks": [
                {
                    "ansible.builtin.template": {
                        "src": str(ROLE / "templates" / "join-agent.j2"),
                        "dest": str(dest / "join-agent"),
                        "mode": "0755",
                    }
                },
                {
                    "ansible.builtin.template": {
                        "src": str(ROLE / "templates" / "provision-join-agent.service.j2"),
                        "dest": str(dest / "provision-join-agent.service"),
                        "mode": "0644",
                    }
                },
            ],
        }
    ]
    (dest / "render.yml").write_text(yaml.safe_dump(play))
    proc = subprocess.run(
        # Extra variables: they beat the defaults file, as an inventory's do at image build.
        [*PLAYBOOK, str(dest / "render.yml"), "-e", json.dumps({"join_agent_libexec_dir": str(dest), **overrides})],
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_PYTHON_INTERPRETER": sys.executable},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest / "join-agent", dest / "provision-join-agent.service"


def test_role_layout() -> None:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert set(defaults) == set(specs)
    assert all(name.startswith("join_agent_") for name in defaults)
    assert defaults["join_agent_url"] == ""
    for family, ssh in (("Debian", "openssh-client"), ("RedHat", "openssh-clients")):
        assert yaml.safe_load((ROLE / "vars" / f"{family}.yml").read_text())["__join_agent_packages"] == [
            "age",
            "curl",
            ssh,
        ]
    for image in ("compute-debian12", "compute-rocky9"):
        assert "join_agent" in yaml.safe_load((ROOT / "images" / f"{image}.yml").read_text())["roles"]


@pytest.mark.integration
@requires(shutil.which("shellcheck") is not None, "shellcheck (./run setup installs it)")
def test_script_and_unit_pass_the_checks(tmp_path: Path) -> None:
    script, unit = render_agent(tmp_path / "libexec", join_agent_url="http://10.0.0.1:8081")
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert '[ -n "$url" ] || url=http://10.0.0.1:8081\n' in text
    for shell in ("sh", "dash"):
        syntax = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, check=False)
        assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert str(unit.name) not in verify.stderr, verify.stderr  # no warning about our unit
    unit_text = unit.read_text()
    assert "After=network-online.target provision-ssh-keygen.service" in unit_text
    assert "Wants=network-online.target" in unit_text
    assert f"ExecStart={script}" in unit_text
    # The image's default (no URL) and no provision.join= on this kernel's command line: nothing to do.
    assert "provision.join=" not in Path("/proc/cmdline").read_text()
    default, _ = render_agent(tmp_path / "default")
    quiet = subprocess.run(
        ["sh", str(default), "--once"],
        env={"PATH": "/usr/bin:/bin", "PROVISION_JOIN_KMSG": "/dev/null"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (quiet.returncode, quiet.stderr) == (0, "provision: join no join service configured\n")


# -- a protocol double of the join service ----------------------------------------------


class JoinDouble:
    """GET /v1/challenge, POST /v1/bundle and /v1/report as the protocol states them."""

    def __init__(self, workdir: Path, node_pub: str, tar: bytes) -> None:
        self.workdir = workdir
        self.tar = tar
        self.failures: list[tuple[int, bytes]] = []  # answers to the next bundle requests
        self.nonces: set[str] = set()
        self.reports: list[dict[str, str]] = []
        self.bundles_served = 0
        self.refusals: list[str] = []
        (workdir / "allowed_signers").write_text(f"{NODE} {node_pub}\n")
        (workdir / "node.pub").write_text(node_pub + "\n")

    def verify(self, message: str, signature: str, node: str) -> bool:
        sig = self.workdir / f"sig-{secrets.token_hex(4)}"
        sig.write_text(signature)
        proc = subprocess.run(
            [*VERIFY, str(self.workdir / "allowed_signers"), "-I", node, "-n", "provision-join@v1", "-s", str(sig)],
            input=message.encode(),
            capture_output=True,
            check=False,
        )
        return proc.returncode == 0

    def take_nonce(self, nonce: str) -> bool:
        if nonce in self.nonces:
            self.nonces.remove(nonce)
            return True
        return False

    def handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def answer(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path != "/v1/challenge" or parse_qs(url.query).get("node") != [NODE]:
                    self.answer(404, b'{"error": "unknown"}')
                    return
                nonce = secrets.token_urlsafe(24)
                double.nonces.add(nonce)
                self.answer(200, json.dumps({"nonce": nonce, "expires_in": 60}).encode())

            def do_POST(self) -> None:
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/bundle":
                    message = f"provision-join-v1\nnode={doc['node']}\nboot_id={doc['boot_id']}\nnonce={doc['nonce']}\n"
                    if not (double.take_nonce(doc["nonce"]) and double.verify(message, doc["signature"], doc["node"])):
                        double.refusals.append("bad signature or nonce")
                        self.answer(403, b'{"error": "bad signature or nonce"}')
                        return
                    if double.failures:
                        code, body = double.failures.pop(0)
                        self.answer(code, body)
                        return
                    sealed = subprocess.run(
                        ["age", "-R", str(double.workdir / "node.pub")],
                        input=double.tar,
                        capture_output=True,
                        check=True,
                    ).stdout
                    double.bundles_served += 1
                    self.answer(200, sealed, "application/octet-stream")
                elif self.path == "/v1/report":
                    message = (
                        f"provision-report-v1\nnode={doc['node']}\nboot_id={doc['boot_id']}\nnonce={doc['nonce']}\n"
                        f"status={doc['status']}\nstep={doc['step']}\n"
                    )
                    if not (double.take_nonce(doc["nonce"]) and double.verify(message, doc["signature"], doc["node"])):
                        self.answer(403, b'{"error": "bad report signature"}')
                        return
                    double.reports.append(doc)
                    self.answer(200, b"{}")
                else:
                    self.answer(404, b"{}")

        return Handler


@pytest.fixture
def node_key(tmp_path: Path) -> tuple[Path, str]:
    key = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key, " ".join(Path(f"{key}.pub").read_text().split()[:2])


@pytest.fixture
def serve() -> Iterator[object]:
    servers: list[ThreadingHTTPServer] = []

    def start(double: JoinDouble) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), double.handler())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run_agent(
    script: Path, url: str, key: Path, root: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    (root.parent / "run").mkdir(exist_ok=True)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PROVISION_JOIN_URL": url,
        "PROVISION_JOIN_HOST_KEY": str(key),
        "PROVISION_JOIN_ROOT": str(root),
        "PROVISION_JOIN_NODE": NODE,
        "PROVISION_JOIN_RUNDIR": str(root.parent / "run"),
        "PROVISION_JOIN_KMSG": "/dev/null",  # the test host's kernel log stays clean
    }
    return subprocess.run(["sh", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)


def make_tar(files: dict[str, tuple[bytes, int]], manifest: dict[str, object]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, (data, mode) in [("manifest.json", (json.dumps(manifest).encode(), 0o600)), *files.items()]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.integration
@requires(shutil.which("age") is not None, "age (./run setup installs it)")
@requires(os.geteuid() == 0, "root: the agent sets the manifest's owners")
def test_agent_installs_the_rendered_bundle(tmp_path: Path, node_key: tuple[Path, str], serve) -> None:  # type: ignore[no-untyped-def]
    """bundle.yml's output, tarred as the service sends it, installed byte for byte with the manifest's owners."""
    pwd.getpwnam("munge")  # ./run setup installs munge: the key's owner exists here
    inv = tmp_path / "inventory"
    write_inventory(inv)
    (inv.parent / "munge.key").write_bytes(os.urandom(1024))
    assert stats(render(inv))["changed"] > 0
    node_dir = inv / ".state" / "service" / "bundles" / NODE
    tar = subprocess.run(
        ["tar", "-C", str(node_dir), "-cf", "-", "manifest.json", "files"], capture_output=True, check=True
    ).stdout
    double = JoinDouble(tmp_path, node_key[1], tar)
    url = serve(double)  # type: ignore[operator]
    script, _ = render_agent(tmp_path / "libexec")
    root = tmp_path / "root"
    root.mkdir()

    proc = run_agent(script, url, node_key[0], root, "--once")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((node_dir / "manifest.json").read_text())
    for entry in manifest["files"]:
        installed = root / entry["path"].lstrip("/")
        assert installed.read_bytes() == (node_dir / "files" / entry["path"].lstrip("/")).read_bytes()
        st = installed.stat()
        assert f"{stat.S_IMODE(st.st_mode):04o}" == entry["mode"], entry
        assert pwd.getpwuid(st.st_uid).pw_name == entry["owner"], entry
    for service in manifest["services"]:
        assert f"provision: join not restarting {service} (--once)" in proc.stderr
    assert [(r["status"], r["step"], r["node"]) for r in double.reports] == [("joined", "done", NODE)]
    assert "bundle-bind-secret-4711" not in proc.stderr
    assert not list((tmp_path / "run").iterdir())  # the decrypted bundle is gone


@pytest.mark.integration
@requires(shutil.which("age") is not None, "age (./run setup installs it)")
@requires(os.geteuid() == 0, "root: the agent sets the manifest's owners")
def test_agent_retries_until_served_and_refuses_foreign_paths(
    tmp_path: Path, node_key: tuple[Path, str], serve
) -> None:  # type: ignore[no-untyped-def]
    manifest = {
        "files": [{"path": "/etc/provision-test/hello", "owner": "root", "group": "root", "mode": "0640"}],
        "services": [],
    }
    double = JoinDouble(tmp_path, node_key[1], make_tar({"etc/provision-test/hello": (b"hello\n", 0o600)}, manifest))
    double.failures = [(503, b'{"error": "bundle not rendered yet"}'), (403, b'{"error": "node01 not pinned"}')]
    url = serve(double)  # type: ignore[operator]
    script, _ = render_agent(tmp_path / "libexec")
    root = tmp_path / "root"
    root.mkdir()

    once = run_agent(script, url, node_key[0], root, "--once")
    assert once.returncode == 75, once.stderr  # 503: try later
    proc = run_agent(script, url, node_key[0], root)  # 403, then served: never gives up
    assert proc.returncode == 0, proc.stderr
    assert 'bundle: refused (403): {"error": "node01 not pinned"}' in proc.stderr
    assert "provision: join retrying in 1s" in proc.stderr
    hello = root / "etc/provision-test/hello"
    assert hello.read_bytes() == b"hello\n" and stat.S_IMODE(hello.stat().st_mode) == 0o640
    assert len(double.reports) == 1

    # A member the manifest does not list, a path outside /etc and /var/lib, a symlink: refused, nothing written.
    bad_cases = {
        "unlisted": make_tar(
            {"etc/provision-test/hello": (b"x\n", 0o600), "etc/shadow": (b"root::0:\n", 0o600)}, manifest
        ),
        "outside": make_tar(
            {"root/.ssh/authorized_keys": (b"ssh-ed25519 AAAA\n", 0o600)},
            {"files": [{"path": "/root/.ssh/authorized_keys", "owner": "root", "group": "root", "mode": "0600"}]},
        ),
        "dotdot": make_tar(
            {"etc/../root/x": (b"x\n", 0o600)},
            {"files": [{"path": "/etc/../root/x", "owner": "root", "group": "root", "mode": "0600"}]},
        ),
    }
    for case, tar in bad_cases.items():
        scratch = tmp_path / f"root-{case}"
        scratch.mkdir()
        double.tar = tar
        refused = run_agent(script, url, node_key[0], scratch, "--once")
        assert refused.returncode == 1, (case, refused.stderr)
        assert list(scratch.rglob("*")) == [], case
