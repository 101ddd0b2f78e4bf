"""The opt-in token policy (``provision_join_trust: token``), for real.

A site without console logs trusts a single-use boot token instead: the
built-in backend puts it in the node's iPXE script (served only to the
address dnsmasq leases the node), the node sends it with its public key,
the service spends it and the backend renders a new one for the next boot.
Weaker than the console policy (whoever reads the script can claim the
node); these tests show what it does guarantee.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from test_boot_builtin import IMAGE, make_store
from test_join_service import NEEDS_TOOLS, NODES, SECRET, Client, FakeNode, untar, write_bundle

from provision import inventory
from provision.boot.base import PrepareOptions, backend_for
from provision.boot.builtin import BuiltinBackend
from provision.errors import ProvisionError
from provision.inventory import Site
from provision.service import JoinService, join_message, report_message
from tests.conftest import run_provision

pytestmark = pytest.mark.integration
NAME = "r1n01"


def make_site(root: Path, **extra: object) -> Site:
    inv = root / "inventory"
    (inv / "group_vars").mkdir(parents=True, exist_ok=True)
    hosts = {
        name: {"provision_mac": f"52:54:00:00:00:0{i}", "provision_ip": ip, "provision_bmc_address": "127.0.0.1"}
        for i, (name, ip) in enumerate(NODES.items(), start=1)
    }
    (inv / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"rack_r1": {"hosts": hosts}}}}))
    all_vars = {
        "provision_network": "127.0.0.0/8",
        "provision_boot_address": "127.0.0.1",
        "provision_state_dir": str(root / "state"),
        "provision_bmc_user": "admin",
        "provision_join_trust": "token",
        "provision_default_image": IMAGE,
        "provision_image_store": str(make_store(root / "store")),
        **extra,
    }
    (inv / "group_vars" / "all.yml").write_text(yaml.safe_dump(all_vars))
    return inventory.load(inv)


def script_of(backend: BuiltinBackend, mac: str) -> str:
    return (backend.docroot / "boot" / f"{mac.replace(':', '-')}.ipxe").read_text()


def token_in(script: str) -> str:
    return next(w.split("=", 1)[1] for w in script.split() if w.startswith("provision.token="))


@NEEDS_TOOLS
def test_a_boot_token_is_spent_once_and_rotated(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    backend = backend_for(site)
    assert isinstance(backend, BuiltinBackend)
    backend.prepare(site, site.nodes, PrepareOptions(serve=False))
    node_cfg = next(n for n in site.nodes if n.name == NAME)
    first = token_in(script_of(backend, node_cfg.mac))
    assert len(first) >= 32
    for name in NODES:
        write_bundle(site.state_dir / "service" / "bundles", name)
    node = FakeNode(NAME, NODES[NAME], tmp_path / "no-console", tmp_path)
    node.boot()  # a key and a boot id; there is no console log to pin it from
    answers: list = []

    async def scenario(client: Client) -> None:
        async def request(token: str, key: Path | None = None, source: str = node.ip) -> int:
            nonce = (await client.challenge(NAME, node.ip)).json()["nonce"]
            body = {
                "node": NAME,
                "boot_id": node.boot_id,
                "nonce": nonce,
                "signature": node.sign(join_message(NAME, node.boot_id, nonce), key),
                "token": token,
                "public_key": node.public_key(),
            }
            answer = await client.bundle(body, source)
            if answer.status == 200:
                files = untar(node.decrypt(answer.body))
                assert files["etc/munge/munge.key"][1].startswith(SECRET)
            return answer.status

        other = tmp_path / "other"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
        assert await request(first, key=other) == 403  # signed with a key other than the one sent
        assert await request("not-the-token") == 403
        assert await request(first) == 200  # the node's own token and key
        assert await request(first) == 403  # spent: a replay, or another machine that read the script
        # The report is signed by the key this boot's token vouched for.
        nonce = (await client.challenge(NAME, node.ip)).json()["nonce"]
        report = {
            "node": NAME,
            "boot_id": node.boot_id,
            "nonce": nonce,
            "status": "joined",
            "step": "done",
            "signature": node.sign(report_message(NAME, node.boot_id, nonce, "joined", "done")),
        }
        assert (await client.request("POST", "/v1/report", node.ip, json=report)).status == 204

    async def main() -> None:
        service = JoinService.from_site(site)
        host, port = await service.start("127.0.0.1", 0)
        try:
            await scenario(Client(f"http://{host}:{port}", answers))
        finally:
            await service.stop()

    asyncio.run(main())
    for answer in answers:
        assert SECRET not in answer.body
    second = token_in(script_of(backend, node_cfg.mac))
    assert second != first  # the next boot's script carries a new token
    tokens = json.loads(backend.tokens_path.read_text())
    assert tokens[NAME] == second and backend.tokens_path.stat().st_mode & 0o777 == 0o600


def test_the_console_policy_puts_no_token_in_any_script(tmp_path: Path) -> None:
    site = make_site(tmp_path, provision_join_trust="console")
    backend = backend_for(site)
    assert isinstance(backend, BuiltinBackend)
    backend.prepare(site, site.nodes, PrepareOptions(serve=False))
    for node in site.nodes:
        script = script_of(backend, node.mac)
        assert "provision.join=http://127.0.0.1:8740" in script and "provision.token=" not in script


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"provision_boot_dhcp_mode": "proxy"}, "provision_join_trust: token needs provision_boot_dhcp_mode: static"),
        ({"provision_boot_backend": "grendel", "provision_grendel_url": "http://127.0.0.1:9"}, "needs the built-in"),
        ({"provision_join_trust": "maybe"}, "provision_join_trust: 'maybe' is not a trust policy"),
    ],
)
def test_the_token_policy_is_refused_where_it_cannot_hold(tmp_path: Path, extra: dict[str, object], words: str) -> None:
    site = make_site(tmp_path, **extra)
    with pytest.raises(ProvisionError) as err:
        JoinService.from_site(site)
    assert words in err.value.message
    result = run_provision("-i", site.path, "service", "run")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1 and words in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@NEEDS_TOOLS
def test_the_agent_joins_with_its_boot_token(tmp_path: Path) -> None:
    """The real agent (roles/join_agent) sends its token and key; the real service spends and rotates the token."""
    from test_join_agent import NodeBoot, agent_env, make_key, render_agent

    site = make_site(tmp_path)
    backend = backend_for(site)
    assert isinstance(backend, BuiltinBackend)
    backend.prepare(site, site.nodes, PrepareOptions(serve=False))
    mac = next(n.mac for n in site.nodes if n.name == NAME)
    token = token_in(script_of(backend, mac))
    write_bundle(site.state_dir / "service" / "bundles", NAME)
    script, _ = render_agent(tmp_path / "libexec")
    node = NodeBoot(tmp_path / "no-console.log", make_key(tmp_path / "ssh_host_ed25519_key"))
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)  # the agent stages the bundle in the target's /etc

    async def main() -> subprocess.CompletedProcess[str]:
        service = JoinService.from_site(site)
        host, port = await service.start("127.0.0.1", 0)
        try:
            env = agent_env(f"http://{host}:{port}", node, root, PROVISION_JOIN_NODE=NAME, PROVISION_JOIN_TOKEN=token)
            proc = await asyncio.create_subprocess_exec(
                "sh", str(script), "--once", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            out, err = await proc.communicate()
            return subprocess.CompletedProcess(["agent"], proc.returncode or 0, out.decode(), err.decode())
        finally:
            await service.stop()

    joined = asyncio.run(main())
    assert joined.returncode == 0, joined.stderr
    assert (root / "etc/munge/munge.key").read_bytes().startswith(SECRET)
    assert token not in joined.stderr  # the token is never logged
    assert token_in(script_of(backend, mac)) != token  # spent: the next boot gets another


def test_a_node_with_inventory_problems_is_not_served(tmp_path: Path) -> None:
    """No valid provision_ip (or any other problem): the service does not know the node at all."""
    site = make_site(tmp_path, provision_join_trust="console")
    hosts_file = site.path / "hosts.yml"
    hosts = yaml.safe_load(hosts_file.read_text())
    hosts["all"]["children"]["rack_r1"]["hosts"]["r1n03"]["provision_ip"] = "not-an-address"
    hosts_file.write_text(yaml.safe_dump(hosts))
    service = JoinService.from_site(inventory.load(site.path))
    assert sorted(service.nodes) == ["r1n01", "r1n02"]
