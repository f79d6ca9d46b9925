"""indibroker: a multiprocess INDI server on a ZeroMQ backbone."""

from typing import Any

__all__ = ["IPyServer", "__version__"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that worker processes importing indibroker.* do not pay for asyncio and the shim.
    if name == "IPyServer":
        from indibroker.shims.ipyserver import IPyServer

        return IPyServer
    raise AttributeError(name)
