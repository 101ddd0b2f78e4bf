"""The control node's LDAP directory: slapd.conf and a throwaway database.

Base DN ``dc=lab,dc=provision`` by default, a test user ``labuser`` (uid
20001) in group ``labusers`` (gid 20001), a bind user for SSSD and, with
``ldap_tls``, StartTLS on the LDAP port and ``ldaps`` with the lab's CA.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping

from provision.lab.control.config import ControlPlaneConfig, ControlPlanePaths, LdapInfo
from provision.lab.control.render import render
from provision.lab.control.secrets import ssha
from provision.proc import run


def ldap_info(paths: ControlPlanePaths, config: ControlPlaneConfig) -> LdapInfo:
    c = config
    return LdapInfo(
        uri=f"ldap://{c.uri_host}:{c.ldap_port}",
        ldaps_uri=f"ldaps://{c.uri_host}:{c.ldaps_port}" if c.ldap_tls else None,
        base_dn=c.base_dn,
        bind_dn=c.bind_dn,
        bind_password_file=paths.password_file("ldap-bind"),
        ca_cert=paths.tls / "ca.crt" if c.ldap_tls else None,
        user=c.ldap_user,
        uid=c.ldap_uid,
        group=c.ldap_group,
        gid=c.ldap_gid,
        user_password_file=paths.password_file("labuser"),
    )


def slapd_urls(config: ControlPlaneConfig) -> list[str]:
    urls = [f"ldap://{config.uri_host}:{config.ldap_port}/"]
    if config.ldap_tls:
        urls.append(f"ldaps://{config.uri_host}:{config.ldaps_port}/")
    return urls


def write_slapd_conf(paths: ControlPlanePaths, config: ControlPlaneConfig, admin_password: str) -> None:
    tls = paths.tls
    variables = {
        "pid_file": paths.pids / "slapd.daemon.pid",
        "args_file": paths.pids / "slapd.args",
        "tls": {"ca_cert": tls / "ca.crt", "cert": tls / "server.crt", "key": tls / "server.key"}
        if config.ldap_tls
        else None,
        "base_dn": config.base_dn,
        "admin_dn": config.admin_dn,
        "admin_password_hash": ssha(admin_password),
        "db_dir": paths.ldap_db,
    }
    render("slapd.conf.j2", paths.etc / "slapd.conf", variables, 0o600)


def load_directory(paths: ControlPlanePaths, config: ControlPlaneConfig, passwords: Mapping[str, str]) -> None:
    """Rebuild the throwaway directory from scratch (slapadd, offline)."""
    c = config
    db = paths.ldap_db
    if db.exists():
        shutil.rmtree(db)
    db.mkdir(mode=0o700)
    ldif = paths.etc / "lab.ldif"
    variables = {
        "base_dn": c.base_dn,
        "dc": c.base_dn.split(",")[0].removeprefix("dc="),
        "bind_dn": c.bind_dn,
        "bind_cn": "sssd",
        "bind_password_hash": ssha(passwords["ldap-bind"]),
        "user": c.ldap_user,
        "uid": c.ldap_uid,
        "group": c.ldap_group,
        "gid": c.ldap_gid,
        "user_password_hash": ssha(passwords["labuser"]),
    }
    render("lab.ldif.j2", ldif, variables, 0o600)
    conf = paths.etc / "slapd.conf"
    run(["slapadd", "-q", "-f", conf, "-l", ldif], hint=f"check {conf}")


def ldapsearch_argv(
    info: LdapInfo, filter: str, attrs: tuple[str, ...], *, bind: bool
) -> tuple[list[str], dict[str, str]]:
    """argv and environment of an ``ldapsearch`` as SSSD would bind (StartTLS when TLS is on)."""
    argv = ["ldapsearch", "-LLL", "-x", "-H", info.uri, "-b", info.base_dn]
    env = {}
    if info.ca_cert is not None:
        argv.append("-ZZ")
        env["LDAPTLS_CACERT"] = str(info.ca_cert)
    if bind:
        argv += ["-D", info.bind_dn, "-y", str(info.bind_password_file)]
    return [*argv, filter, *attrs], env
