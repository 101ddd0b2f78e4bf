"""State shared by every command: global options and the loaded site."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from provision import inventory
from provision.inventory import Node, Site


@dataclass
class AppContext:
    inventory_path: Path
    vault_password_file: str | None = None
    debug: bool = False
    verbose: int = 0
    _site: Site | None = field(default=None, repr=False)

    @property
    def site(self) -> Site:
        if self._site is None:
            self._site = inventory.load(self.inventory_path, vault_password_file=self.vault_password_file)
        return self._site

    def select(self, selection: dict[str, Any], *, validate: bool = True) -> tuple[Node, ...]:
        nodes = self.site.select(
            rack=selection.get("rack"), nodes=selection.get("nodes"), all_nodes=bool(selection.get("all_nodes"))
        )
        if validate:
            self.site.require_valid(nodes)
        return nodes


pass_app = click.make_pass_decorator(AppContext)


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
