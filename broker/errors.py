"""The one exception tree of indibroker; each boundary maps its failures into it.

    IndibrokerError
     ├── ConfigError        bad configuration: names the file, key and what was expected
     ├── RuntimeDirBusy     another indibroker already holds this instance's runtime directory
     ├── ControlError       the control socket could not be reached or refused a command
     └── MalformedInput     bytes from a peer that are not acceptable INDI (socket, pipe, XML)
"""

from __future__ import annotations

__all__ = ["IndibrokerError", "ConfigError", "RuntimeDirBusy", "ControlError", "MalformedInput"]


class IndibrokerError(Exception):
    """Base of every error indibroker raises on purpose."""


class ConfigError(IndibrokerError):
    """The configuration (file or flags) cannot be used as given."""


class RuntimeDirBusy(IndibrokerError):
    """The runtime directory is locked by a running instance."""


class ControlError(IndibrokerError):
    """The control socket is unreachable or answered with an error."""


class MalformedInput(IndibrokerError):
    """Input that is not well-formed, bounded INDI XML."""

    elements: list = []  # what a decoder completed before the fault, set where it is raised
