"""The inventory: read with Ansible, validated with netaddr, one line per problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLE_INVENTORY, run_provision

from provision import inventory
from provision.errors import InventoryError

VALID_HOSTS = {
    "all": {
        "children": {
            "rack_t1": {
                "hosts": {
                    "node01": {"provision_mac": "52:54:00:00:00:01", "provision_ip": "10.99.0.11"},
                    "node02": {"provision_mac": "52:54:00:00:00:02", "provision_ip": "10.99.0.12"},
                    "node03": {"provision_mac": "52-54-00-00-00-03", "provision_ip": "10.99.0.13"},
                }
            },
            "rack_t2": {"hosts": {"node[04:05]": None}},
        }
    }
}
VALID_ALL = {
    "provision_network": "10.99.0.0/24",
    "provision_default_image": "base-debian12",
    "provision_bmc_user": "admin",
    "provision_bmc_address": "127.0.0.1",
    "provision_bmc_password_env": "TEST_BMC_PASSWORD",
}
RACK_T2 = {
    "provision_ip": "10.99.0.{{ inventory_hostname[-2:] | int + 20 }}",
    "provision_mac": "52:54:00:00:01:{{ '%02x' | format(inventory_hostname[-2:] | int) }}",
}


def write_site(root: Path, hosts: object = None, all_vars: object = None, extra: dict[str, str] | None = None) -> Path:
    site = root / "site"
    (site / "group_vars").mkdir(parents=True)
    (site / "hosts.yml").write_text(yaml.safe_dump(VALID_HOSTS if hosts is None else hosts))
    (site / "group_vars" / "all.yml").write_text(yaml.safe_dump(VALID_ALL if all_vars is None else all_vars))
    (site / "group_vars" / "rack_t2.yml").write_text(yaml.safe_dump(RACK_T2))
    for rel, text in (extra or {}).items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    return site


def with_host(**overrides: object) -> dict[str, object]:
    hosts = json.loads(json.dumps(VALID_HOSTS))
    hosts["all"]["children"]["rack_t1"]["hosts"]["node02"].update(overrides)
    return hosts


def test_valid_site_loads_typed_frozen_nodes(tmp_path: Path) -> None:
    site = inventory.load(write_site(tmp_path))
    assert site.problems == ()
    assert [r.name for r in site.racks] == ["t1", "t2"]
    node03 = next(n for n in site.nodes if n.name == "node03")
    assert node03.mac == "52:54:00:00:00:03"  # normalised
    assert node03.image == "base-debian12"  # default from group_vars
    assert node03.bmc is not None and node03.bmc.port == 623
    node05 = next(n for n in site.nodes if n.name == "node05")
    assert (node05.ip, node05.mac, node05.rack) == ("10.99.0.25", "52:54:00:00:01:05", "t2")
    with pytest.raises(AttributeError):
        node05.ip = "10.0.0.1"  # type: ignore[misc]


def test_host_vars_override_group_vars_as_in_ansible(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path, extra={"host_vars/node04.yml": "provision_ip: 10.99.0.99\n"})
    site = inventory.load(site_dir)
    assert next(n for n in site.nodes if n.name == "node04").ip == "10.99.0.99"


def test_password_comes_from_env_at_use_and_never_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = inventory.load(write_site(tmp_path))
    bmc = site.nodes[0].bmc
    assert bmc is not None
    monkeypatch.setenv("TEST_BMC_PASSWORD", "hunter2-secret")
    assert bmc.password.reveal() == "hunter2-secret"
    assert "hunter2" not in repr(site.nodes[0])
    assert "hunter2" not in json.dumps(site.nodes[0].as_dict())


def test_vaulted_password_is_decrypted(tmp_path: Path) -> None:
    vault_pass = tmp_path / "vault-pass"
    vault_pass.write_text("correct horse\n")
    encrypted = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-vault"), "encrypt_string", "--vault-password-file", str(vault_pass),
         "vaulted-secret", "--name", "provision_bmc_password"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    site_dir = write_site(tmp_path, extra={"group_vars/rack_t1.yml": encrypted})
    site = inventory.load(site_dir, vault_password_file=str(vault_pass))
    assert site.problems == ()
    node = next(n for n in site.nodes if n.rack == "t1")
    assert node.bmc is not None and node.bmc.password.reveal() == "vaulted-secret"


def test_selection_by_rack_nodeset_and_all(tmp_path: Path) -> None:
    site = inventory.load(write_site(tmp_path))
    assert [n.name for n in site.select(rack="t2")] == ["node04", "node05"]
    assert [n.name for n in site.select(rack="rack_t2")] == ["node04", "node05"]
    assert [n.name for n in site.select(nodes="node[01-02,05]")] == ["node01", "node02", "node05"]
    assert [n.name for n in site.select(rack="t1", nodes="node[02-05]")] == ["node02", "node03"]
    assert len(site.select(all_nodes=True)) == 5
    with pytest.raises(InventoryError, match="no nodes selected"):
        site.select()
    with pytest.raises(InventoryError, match="not in the inventory: node99"):
        site.select(nodes="node99")


# Each broken inventory: (id, how to break it, expected node, expected field).
BROKEN = [
    ("malformed-mac", lambda: {"hosts": with_host(provision_mac="52:54:zz:00:00:02")}, "node02", "provision_mac"),
    ("missing-mac", lambda: {"hosts": with_host(provision_mac="")}, "node02", "provision_mac"),
    ("duplicate-mac", lambda: {"hosts": with_host(provision_mac="52:54:00:00:00:01")}, "node02", "provision_mac"),
    ("duplicate-ip", lambda: {"hosts": with_host(provision_ip="10.99.0.11")}, "node02", "provision_ip"),
    ("malformed-ip", lambda: {"hosts": with_host(provision_ip="10.99.0.300")}, "node02", "provision_ip"),
    ("ip-outside-subnet", lambda: {"hosts": with_host(provision_ip="10.98.0.12")}, "node02", "provision_ip"),
    ("bmc-address-missing", lambda: {"hosts": with_host(provision_bmc_address="")}, "node02", "provision_bmc_address"),
    ("bmc-port-invalid", lambda: {"hosts": with_host(provision_bmc_port=70000)}, "node02", "provision_bmc_port"),
    ("bmc-protocol-unknown", lambda: {"hosts": with_host(provision_bmc_protocol="telnet")}, "node02", "provision_bmc_protocol"),
    ("bmc-password-plain", lambda: {"hosts": with_host(provision_bmc_password="admin")}, "node02", "provision_bmc_password"),
    ("unknown-image", lambda: {"hosts": with_host(provision_image="windows95")}, "node02", "provision_image"),
    ("hostname-rfc952", lambda: {"hosts": {"all": {"children": {"rack_t1": {"hosts": {"node_02": {"provision_mac": "52:54:00:00:00:02", "provision_ip": "10.99.0.12"}}}}}}}, "node_02", "hostname"),
    ("hostname-dotted", lambda: {"hosts": {"all": {"children": {"rack_t1": {"hosts": {"cn01.site": {"provision_mac": "52:54:00:00:00:02", "provision_ip": "10.99.0.12"}}}}}}}, "cn01.site", "hostname"),
    ("hostname-in-two-racks", lambda: {"hosts": {"all": {"children": {**VALID_HOSTS["all"]["children"], "rack_t3": {"hosts": {"node01": None}}}}}}, "node01", "hostname"),
    ("network-missing", lambda: {"all_vars": {k: v for k, v in VALID_ALL.items() if k != "provision_network"}}, "site", "provision_network"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "breakage", "node", "field"), BROKEN, ids=[b[0] for b in BROKEN])
def test_check_reports_each_fault_on_one_line(
    tmp_path: Path, case: str, breakage: object, node: str, field: str
) -> None:
    site_dir = write_site(tmp_path, **breakage())  # type: ignore[operator]
    result = run_provision("-i", site_dir, "inventory", "check")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    problem_lines = [line for line in result.stderr.splitlines() if line.startswith(f"{node}: {field}: ")]
    assert len(problem_lines) == 1, result.stderr
    assert "; fix: " in problem_lines[0]
    assert result.stderr.rstrip().endswith("then run `provision inventory check`")


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("malformed-yaml", ("inventory", "check"), "cannot parse"),
        ("missing-file", ("inventory", "check"), "does not exist"),
        ("unknown-rack", ("node", "list", "--rack", "r9"), "--rack: unknown rack 'r9' (racks: t1, t2)"),
        ("bad-nodeset", ("node", "list", "--nodes", "node[01-"), "--nodes: 'node[01-' is not a nodeset"),
    ],
)
def test_unreadable_inventory_and_bad_selection_fail_in_one_line(
    tmp_path: Path, case: str, args: tuple[str, ...], message: str
) -> None:
    site_dir = write_site(tmp_path)
    if case == "malformed-yaml":
        (site_dir / "hosts.yml").write_text("all:\n  children:\n    rack_t1: [unclosed\n")
    if case == "missing-file":
        site_dir = tmp_path / "nowhere"
    result = run_provision("-i", site_dir, *args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert any(line.startswith("hint: ") for line in result.stderr.splitlines())


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_provision("--debug", "-i", tmp_path / "nowhere", "inventory", "check")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_example_site_checks_clean(example_inventory: Path) -> None:
    result = run_provision("-i", example_inventory, "inventory", "check")
    assert result.returncode == 0, result.stderr
    assert "23 nodes" in result.stdout


def test_example_rack_r2_lists_sixteen_expanded_nodes(example_inventory: Path) -> None:
    result = run_provision("-i", example_inventory, "node", "list", "--rack", "r2", "--json")
    assert result.returncode == 0, result.stderr
    nodes = json.loads(result.stdout)
    assert [n["name"] for n in nodes] == [f"cn{i:02d}" for i in range(1, 17)]
    assert len({n["mac"] for n in nodes}) == 16 and len({n["ip"] for n in nodes}) == 16
    assert all(n["rack"] == "r2" and n["image"] == "compute-rocky9" for n in nodes)


def test_node_list_table_names_every_column(example_inventory: Path) -> None:
    result = run_provision("-i", example_inventory, "node", "list", "--rack", "r1")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "RACK", "MAC", "IP", "BMC", "IMAGE"]
    assert rows[0].split()[:4] == ["gpu01", "r1", "3c:ec:ef:10:01:01", "10.10.1.11"]


def test_plain_ansible_reads_the_same_inventory(example_inventory: Path) -> None:
    ansible = Path(sys.executable).parent / "ansible"
    result = subprocess.run(
        [str(ansible), "-i", str(example_inventory), "cn16", "-m", "ansible.builtin.debug", "-a", "var=provision_ip"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert '"provision_ip": "10.10.2.26"' in result.stdout


@pytest.mark.parametrize("group", ["inventory", "node"])
def test_help_reads_well(group: str) -> None:
    top = run_provision("--help")
    assert top.returncode == 0 and "--inventory" in top.stdout and group in top.stdout
    sub = run_provision(group, "--help")
    assert sub.returncode == 0 and "Usage: provision " + group in sub.stdout


@pytest.mark.parametrize("name", ["cn01.site", "node_02", "1node", "-cn", "cn-", "x" * 64])
def test_inventory_and_backends_share_one_host_name_rule(name: str) -> None:
    """A name inventory check refuses is refused by every backend's record, with the same words."""
    from provision.boot.base import check_host_name
    from provision.errors import BootError
    from provision.names import HOST_RULE, host_name_problem

    problem = host_name_problem(name)
    assert problem is not None
    with pytest.raises(BootError) as err:
        check_host_name(name)
    assert problem in err.value.message and err.value.hint == HOST_RULE
    assert host_name_problem("cn01") is None and check_host_name("CN01") == "cn01"


# --- Property-based: the MAC/IP/nodeset normalisers -------------------------------------------------

import contextlib  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from provision.inventory import parse_ip, parse_mac  # noqa: E402

_ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40), st.lists(st.integers(), max_size=3)
)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=6, max_size=6), st.sampled_from([":", "-"]), st.booleans())
def test_parse_mac_round_trips_unicast_macs(raw: bytes, sep: str, upper: bool) -> None:
    text = sep.join(f"{b:02x}" for b in raw)
    text = text.upper() if upper else text
    try:
        mac = parse_mac(text)
    except ValueError as exc:
        assert raw[0] & 1 or raw == bytes(6), exc  # refused only when multicast/broadcast or all-zero
        return
    assert mac == ":".join(f"{b:02x}" for b in raw)
    assert parse_mac(mac) == mac


@settings(max_examples=150, deadline=None)
@given(_ANY_VALUE)
def test_parse_mac_and_ip_refuse_with_value_error_only(value: object) -> None:
    for parser in (parse_mac, parse_ip):
        with contextlib.suppress(ValueError):
            parser(value)


@settings(max_examples=150, deadline=None)
@given(st.ip_addresses())
def test_parse_ip_is_canonical(address: object) -> None:
    try:
        text = parse_ip(str(address))
    except ValueError:
        return
    assert parse_ip(text) == text


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="cn[]-,0123456789@:x^!", max_size=20))
def test_selection_refuses_any_nodeset_with_inventory_error(nodes: str) -> None:
    from provision import inventory as inv

    site = inv.load(EXAMPLE_INVENTORY)
    try:
        chosen = site.select(nodes=nodes)
    except InventoryError:
        return
    assert chosen and all(n.name in {m.name for m in site.nodes} for n in chosen)


def test_an_images_directory_inside_the_inventory_is_refused(tmp_path: Path) -> None:
    """Ansible would read its definitions as inventory (a planted one could add a rack)."""
    site_dir = write_site(tmp_path)
    (site_dir / "images").mkdir()
    # A definition that Ansible also reads as inventory: a group "rack_evil" with a host.
    (site_dir / "images" / "evil.yml").write_text("rack_evil:\n  hosts:\n    planted01: {}\n")
    all_vars = site_dir / "group_vars" / "all.yml"
    all_vars.write_text(all_vars.read_text() + "\nprovision_images_dir: images\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run_provision("-i", site_dir, "inventory", "check")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "provision_images_dir" in errors[0] and "inside the inventory directory" in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
