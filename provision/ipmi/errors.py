"""The BMC errors of the IPMI client (``provision.bmc`` re-exports them)."""

from __future__ import annotations

from provision.errors import BmcError

AUTH_HINT = (
    "check provision_bmc_user and provision_bmc_password (vault) or the variable named by "
    "provision_bmc_password_env for this node"
)
UNREACHABLE_HINT = "check provision_bmc_address/provision_bmc_port and that the BMC is on the network"
CIPHER_HINT = "enable cipher suite 17 or 3 on the BMC (never 0)"
PRIVILEGE_HINT = "give provision_bmc_user operator (or administrator) privilege on the BMC's LAN channel"


class BmcAuthError(BmcError):
    """The BMC refused the credentials."""


class BmcUnreachableError(BmcError):
    """The BMC did not answer."""


class OperationError(Exception):
    """Raised by an operation (a BMC refused a command); the session prefixes the BMC's name."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
