"""Drop-in faces users already know: the IPyServer API and the indiserver command line."""

from typing import Any

__all__ = ["IPyServer"]


def __getattr__(name: str) -> Any:
    if name == "IPyServer":
        from indibroker.shims.ipyserver import IPyServer

        return IPyServer
    raise AttributeError(name)
