"""What `-vv` and `-vvv` show, as indiserver's levels mean: one line per message with its
connection and direction (DEBUG), or the message's XML itself (TRACE), on the logger
`indibroker.traffic`. Off (INFO and above) it costs one attribute test per message."""

from __future__ import annotations

import logging
import weakref

from indibroker.broker.runtime import TRACE

__all__ = ["TRACE", "Traffic", "set_log_level"]

_log = logging.getLogger("indibroker.traffic")
_instances: weakref.WeakSet[Traffic] = weakref.WeakSet()


def set_log_level(level: str) -> None:
    """This process's log level, changed at run time (`indibroker loglevel`, the server device):
    the root logger's, and what every `Traffic` tests per message."""
    logging.getLogger().setLevel(logging.getLevelName(level.upper()))
    for traffic in list(_instances):
        traffic.refresh()


class Traffic:
    __slots__ = ("on", "xml", "__weakref__")

    def __init__(self) -> None:
        self.refresh()
        _instances.add(self)

    def refresh(self) -> None:
        level = _log.getEffectiveLevel()
        self.on = level <= logging.DEBUG  # callers test this before calling `log`
        self.xml = level <= TRACE

    def log(self, who: str, arrow: str, raw: bytes | memoryview, device: str = "", name: str = "") -> None:
        """`who` the connection (client address, driver name), `arrow` the direction."""
        data = bytes(raw)
        if self.xml:
            _log.log(TRACE, "%s %s %s", who, arrow, data.decode(errors="replace").strip())
        else:
            end = min(i for i in (data.find(b" "), data.find(b">"), data.find(b"/"), len(data)) if i > 0)
            _log.debug("%s %s %s %s%s (%d bytes)", who, arrow, data[1:end].decode(errors="replace"), device,
                       f".{name}" if name else "", len(data))
