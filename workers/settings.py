"""Typed settings of each worker kind, made by `broker.config.Config` from the validated config.

They hold no defaults: every default lives once, in `Config` (which takes the codec's and the
supervision policy's where those are the source). A worker is given its settings object itself
(workers are forked from the arbiter), so nothing is re-parsed on the way. A driver's settings
also travel down a lifeline when a driver is added at run time: `DriverSettings.from_dict` is
strict, so an unknown or missing key is an error, never silently dropped.

What the arbiter knows about a worker's past (drivers an operator stopped, devices a dead
predecessor left) is not a setting: it is `Inheritance`, handed to the worker at start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from indibroker.broker.supervision import RestartPolicy
from indibroker.workers.access import AccessPolicy

__all__ = ["WorkerSettings", "BrokerSettings", "GatewaySettings", "DriverSettings", "ExDriverSettings",
           "RemoteSettings", "ServerDeviceSettings", "Inheritance", "EXIT_NO_DRIVERS"]


@dataclass(frozen=True)
class WorkerSettings:
    name: str
    liveness: float  # seconds without a sign of life before the arbiter calls the worker hung


@dataclass(frozen=True)
class BrokerSettings(WorkerSettings):
    hosts_endpoint: str | None  # tcp://ADDR:PORT where joined hosts connect (CURVE), or None
    keys: str | None  # the directory of server.key_secret and hosts/*.key


@dataclass(frozen=True)
class GatewaySettings(WorkerSettings):
    host: str
    port: int
    maxconnections: int  # across every gateway; 0: unlimited
    blob_drop_bytes: int  # a client this far behind loses streaming BLOBs (indiserver -d)
    max_queue_bytes: int  # a client this far behind is dropped (indiserver -m)
    max_element: int  # largest element a client may send
    max_partial_bytes: int  # unfinished client input the gateway holds in total
    access: AccessPolicy  # who may connect, and who may change what
    listen_fd: int = -1  # the arbiter's listening socket, inherited (-1: listen on host:port itself)
    local_socket: str = ""  # indiserver's local socket (`-u`) for local clients ("": none)
    local_fd: int = -1  # ... listening, inherited from the arbiter (-1: listen on it itself)
    server_device: ServerDeviceSettings | None = None  # the server device, hosted by the first gateway


@dataclass(frozen=True)
class DriverSettings:
    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    policy: RestartPolicy
    queue_bytes: int  # commands held for a driver that is not reading
    hang_timeout: float  # a driver that reads none of its waiting input this long is restarted
    max_element: int  # largest element it may send
    unfinished_timeout: float  # an element it leaves unfinished this long is skipped
    snoop_messages: bool  # does it get snooped devices' <message>s (Python drivers: no)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriverSettings:
        """The inverse of `to_dict`; raises TypeError on an unknown or missing key."""
        values = dict(data)
        values["argv"] = tuple(values.get("argv", ()))
        values["policy"] = RestartPolicy(**values.get("policy", {}))
        return cls(**values)


# An exdriver worker's exit status when every driver it ran is gone for good and its settings
# say `exit_when_no_drivers`: the arbiter then does not restart it (indiserver's exit rule).
EXIT_NO_DRIVERS = 69


@dataclass(frozen=True)
class ExDriverSettings(WorkerSettings):
    drivers: tuple[DriverSettings, ...]
    log_dir: str | None  # one rotated log file per driver, or None
    exit_when_no_drivers: bool  # exit with EXIT_NO_DRIVERS once no driver runs or will restart
    indiserver_messages: bool  # write indiserver's stderr lines about drivers (KStars reads them)
    # pass libindi drivers' BLOB buffers by reference (off where BLOBs cross hosts: docs/hosts.md)
    share_blobs: bool = True


@dataclass(frozen=True)
class RemoteSettings(WorkerSettings):
    host: str
    port: int
    device: str  # only this device of the remote server ("": all)
    blob_enable: bool  # ask the remote for BLOBs (enableBLOB Also)
    snoop_up: bool  # relay our devices' traffic up, for the remote's snooping drivers
    max_element: int
    own_device: str = ""  # our server device's name: a chained indibroker's of that name is not relayed


@dataclass(frozen=True)
class ServerDeviceSettings(WorkerSettings):
    device: str  # the INDI device's name
    host: str  # where clients reach us, shown on the device
    port: int


@dataclass
class Inheritance:
    """What a (re)started worker is told of its predecessor's time, by the arbiter."""

    stopped: frozenset[str] = frozenset()  # drivers an operator stopped: they stay stopped
    orphaned: tuple[str, ...] = field(default=())  # devices a dead predecessor's drivers owned
