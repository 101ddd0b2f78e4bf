"""Typed errors. The library raises these; only provision.cli prints them."""

from __future__ import annotations

from collections.abc import Sequence


class ProvisionError(Exception):
    """An error an operator can act on: a message and a hint for the fix."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InventoryError(ProvisionError):
    """The inventory cannot be read or selects nothing sensible."""


class ValidationError(InventoryError):
    """The inventory was read but breaks one or more rules."""

    def __init__(self, problems: Sequence[object]) -> None:
        self.problems = list(problems)
        count = len(problems)
        super().__init__(
            f"inventory has {count} problem{'s' if count != 1 else ''}",
            hint="fix each line above, then run `provision inventory check`",
        )


class CommandError(ProvisionError):
    """A subprocess failed."""


class BmcError(ProvisionError):
    """A BMC could not be reached or refused an operation."""


class ImageError(ProvisionError):
    """An image definition is wrong or an image build failed."""


class BootError(ProvisionError):
    """A boot backend refused or failed an operation."""


class RolloutError(ProvisionError):
    """A rolling re-image was refused (nothing changed) or could not go on."""
