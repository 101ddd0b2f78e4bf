"""The built-in boot backend: dnsmasq (DHCP + TFTP), iPXE and nginx on this node.

For one admin node (small sites, the virtual rack); everything lives under
``<state_dir>/boot`` (``layout``). One module per job:

* ``config``: ``BuiltinConfig``, read from the inventory's variables;
* ``layout``: the state directory's paths;
* ``registry``: hosts, image versions, the active version, one-time boot tokens;
* ``render``: dnsmasq/nginx configs, iPXE scripts, image links (jinja2 templates);
* ``services``: starting, reloading and stopping dnsmasq and nginx;
* ``backend``: ``BuiltinBackend``, the ``BootBackend`` built from the above.

Why nginx: many nodes fetch the same 200 MB squashfs at once and dracut's
livenet and iPXE want range requests; nginx serves static files with
sendfile from an event loop (``bench/http_serving.py`` measures it against
Python's ``http.server``).
"""

from __future__ import annotations

from provision.boot.builtin.backend import BuiltinBackend
from provision.boot.builtin.config import BuiltinConfig, DhcpMode, UefiLoader
from provision.boot.builtin.layout import Layout, Service
from provision.boot.builtin.registry import ImageVersionRecord
from provision.boot.builtin.render import BASE_CMDLINE, mac_file_name

__all__ = [
    "BASE_CMDLINE",
    "BuiltinBackend",
    "BuiltinConfig",
    "DhcpMode",
    "ImageVersionRecord",
    "Layout",
    "Service",
    "UefiLoader",
    "mac_file_name",
]
