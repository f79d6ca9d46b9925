"""Configuration: one schema, filled from a TOML file and then from command-line flags.

Flags override the file. Every key is checked: an unknown key or a wrong type is a ConfigError
naming the file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indibroker.broker.errors import ConfigError
from indibroker.broker.hosts import HostKeys, JoinLink, valid_host_name
from indibroker.broker.listening import INDI_PORT
from indibroker.broker.supervision import RestartPolicy
from indibroker.workers.access import AccessPolicy, parse_networks
from indibroker.workers.codec import DEFAULT_MAX_ELEMENT
from indibroker.workers.settings import (
    BrokerSettings,
    DriverSettings,
    ExDriverSettings,
    GatewaySettings,
    RemoteSettings,
    ServerDeviceSettings,
)

__all__ = ["Config", "DriverConfig", "RemoteConfig", "load_toml", "default_gateways", "driver_name"]

MB = 1024 * 1024
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # TRACE: workers/traffic.py


def default_gateways() -> int:
    """One gateway per two cores beyond the first two, at most four: the rest go to drivers."""
    cpus = os.cpu_count() or 1
    return 1 if cpus <= 2 else min(4, cpus // 2)


@dataclass
class DriverConfig:
    argv: list[str]
    name: str = ""
    env: dict[str, str] = field(default_factory=dict)
    restart: dict[str, Any] = field(default_factory=dict)
    # indipydriver 3.1.2 drivers crash on a snooped <message> (events.message typo), so Python
    # drivers get snooped property traffic but not messages; executables get both, as indiserver.
    snoop_messages: bool = True
    may_appear_later: bool = False  # its executable may be installed after start: not a config error

    @classmethod
    def python(cls, spec: str, name: str = "", **kw: Any) -> DriverConfig:
        """A Python driver given as ``package.module:attribute``, run in its own process."""
        from indibroker.workers.pydriver import argv_for

        if ":" not in spec:
            raise ConfigError(f"python driver {spec!r}: expected package.module:attribute")
        # Unnamed, it is named after its attribute by `Config.assign_names` (made unique there).
        return cls(argv=argv_for(spec), name=name, snoop_messages=False, **kw)

    def settings(self, config: Config) -> DriverSettings:
        return DriverSettings(
            name=self.name, argv=tuple(self.argv), env=dict(self.env),
            policy=RestartPolicy(**{**config.restart, **self.restart}),
            queue_bytes=int(config.driver_queue_mb * MB), hang_timeout=config.hang_timeout,
            max_element=int(config.driver_max_element_mb * MB),
            unfinished_timeout=config.driver_unfinished_timeout, snoop_messages=self.snoop_messages,
        )


@dataclass
class RemoteConfig:
    """Another INDI server whose devices we serve (indiserver's ``[device]@host[:port]``)."""

    host: str
    port: int = INDI_PORT
    device: str = ""  # only this device, as indiserver's device@host:port
    blob_enable: bool = False
    name: str = ""
    snoop_up: bool = True  # relay our devices' traffic up, for the remote's snooping drivers

    @classmethod
    def parse(cls, text: str, blob_enable: bool = False) -> RemoteConfig:
        """``[device@]host[:port]``, as on indiserver's command line."""
        device, at, rest = text.rpartition("@")
        host, colon, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
        if not host or (colon and not port.isdigit()):
            raise ConfigError(f"remote {text!r}: expected [device@]host[:port]")
        return cls(host=host, port=int(port) if colon else INDI_PORT, device=device if at else "",
                   blob_enable=blob_enable)

    def settings(self, config: Config) -> RemoteSettings:
        return RemoteSettings(name=self.name, liveness=config.worker_liveness, host=self.host, port=self.port,
                              device=self.device, blob_enable=self.blob_enable, snoop_up=self.snoop_up,
                              max_element=int(config.driver_max_element_mb * MB), own_device=config.server_device)


@dataclass
class Config:
    host: str = "localhost"
    port: int = INDI_PORT
    gateways: int = field(default_factory=default_gateways)
    maxconnections: int = 0  # 0: unlimited
    # Access rules (workers/access.py), off by default: CIDR networks.
    allow: list[str] = field(default_factory=list)  # clients may connect only from these (empty: any)
    read_only: list[str] = field(default_factory=list)  # clients from these may not change anything
    write_rules: dict[str, list[str]] = field(default_factory=dict)  # device -> who may change it
    max_connections_per_address: int = 0  # 0: unlimited
    # indiserver's local socket (`-u`): a unix socket (abstract on Linux) for clients on this
    # machine, which receive BLOBs as shared memory buffers; "" for none.
    local_socket: str = ""
    exdriver_workers: int = 1
    drivers: list[DriverConfig] = field(default_factory=list)
    remotes: list[RemoteConfig] = field(default_factory=list)
    demo: bool = True  # serve the demo driver when nothing else is configured
    blob_drop_mb: float = 5.0  # indiserver -d
    client_max_mb: float = 128.0  # indiserver -m
    client_max_element_mb: float = 16.0
    gateway_max_partial_mb: float = 64.0  # unfinished client input one gateway holds, in total
    driver_queue_mb: float = 8.0
    driver_max_element_mb: float = DEFAULT_MAX_ELEMENT / MB
    hang_timeout: float = 60.0
    driver_unfinished_timeout: float = 10.0  # an element a driver leaves unfinished this long is skipped
    worker_liveness: float = 30.0  # a worker silent this long (hung) is killed and restarted
    restart: dict[str, Any] = field(default_factory=dict)  # RestartPolicy defaults for drivers
    fifo: str | None = None
    log_dir: str | None = None
    log_level: str = "INFO"
    # indiserver's ways, which `indibroker-indiserver` turns on: exit with status 1 once no driver
    # is left (without -f), and its stderr lines about drivers that tools parse (KStars).
    exit_when_no_drivers: bool = False
    indiserver_messages: bool = False
    # The supervision served as an INDI device of this name ("": none; workers/serverdevice.py).
    server_device: str = "indibroker"
    runtime_dir: str | None = None
    # Several hosts, one installation (docs/hosts.md): the central server listens for joining
    # hosts on `hosts_endpoint`; a joining host's workers connect to `join` as `host_name`.
    hosts_endpoint: str | None = None  # tcp://ADDR:PORT, CURVE-authenticated; off by default
    keys: str | None = None  # key directory (broker/hosts.py says what it holds on each side)
    join: str | None = None  # the central server's hosts endpoint: run as a joined host
    host_name: str = ""  # a joined host's name: its key's name
    host_heartbeat: float = 2.0  # a joined host's heartbeat: it is lost after three silent ones
    # Where each key's value came from (a file or a flag), to name it in a problem.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def access_policy(self) -> AccessPolicy:
        """The access rules; ValueError naming where a network that is not one came from."""
        def where(key: str, label: str = "") -> str:
            source = self.sources.get(key, "")
            return f"{source} " if source.startswith("-") else f"{source or 'default'}: {label or key}: "

        return AccessPolicy(
            allow=parse_networks(self.allow, where("allow")),
            read_only=parse_networks(self.read_only, where("read_only")),
            write_rules={device: parse_networks(nets, where("write_rules", f"write_rules.{device}"))
                         for device, nets in self.write_rules.items()},
            max_per_address=self.max_connections_per_address,
        )

    # -- each worker's settings (the defaults above are the only ones) ------------------------
    def broker_settings(self) -> BrokerSettings:
        return BrokerSettings(name="broker", liveness=self.worker_liveness, hosts_endpoint=self.hosts_endpoint,
                              keys=self.keys)

    def join_link(self) -> JoinLink | None:
        """How this (joined) host's workers reach the central server; None when not joining."""
        if not self.join:
            return None
        return JoinLink(endpoint=self.join, host=self.host_name, keys=str(Path(self.keys or ".").resolve()),
                        heartbeat=self.host_heartbeat)

    def gateway_settings(self, index: int, server_device: bool = False) -> GatewaySettings:
        """Gateway `index`'s settings; with `server_device`, it hosts the server device (the
        arbiter asks that of the first gateway, unless there is none or this host joins another)."""
        return GatewaySettings(
            name=f"gateway-{index}", liveness=self.worker_liveness, host=self.host, port=self.port,
            maxconnections=self.maxconnections, blob_drop_bytes=int(self.blob_drop_mb * MB),
            max_queue_bytes=int(self.client_max_mb * MB), max_element=int(self.client_max_element_mb * MB),
            max_partial_bytes=int(self.gateway_max_partial_mb * MB), access=self.access_policy(),
            local_socket=self.local_socket,
            server_device=self.server_device_settings() if server_device and self.server_device else None,
        )

    def exdriver_settings(self, index: int, drivers: list[DriverSettings]) -> ExDriverSettings:
        return ExDriverSettings(name=f"exdriver-{index}", liveness=self.worker_liveness, drivers=tuple(drivers),
                                log_dir=self.log_dir, exit_when_no_drivers=self.exit_when_no_drivers,
                                indiserver_messages=self.indiserver_messages,
                                share_blobs=not (self.hosts_endpoint or self.join))

    def server_device_settings(self) -> ServerDeviceSettings:
        return ServerDeviceSettings(name="serverdevice", liveness=self.worker_liveness, device=self.server_device,
                                    host=self.host, port=self.port)

    def validate(self, check_executables: bool = True) -> None:
        """Check every value; raise ConfigError with one line per problem, each naming where
        the value came from (file and key, or flag) and what was expected. A driver executable
        missing from PATH is a problem unless that driver `may_appear_later` (or the caller,
        like indiserver's command line, treats a driver that cannot start as a driver exit)."""
        problems: list[str] = []

        def bad(key: str, expected: str) -> None:
            value = getattr(self, key)
            source = self.sources.get(key, "")
            where = f"{source} {value}" if source.startswith("-") else \
                f"{source or 'default'}: {key} = {value!r}"
            problems.append(f"{where}: {expected}")

        level = self.log_level.upper()
        if level not in LOG_LEVELS:
            bad("log_level", f"expected one of {', '.join(LOG_LEVELS)}")
        else:
            self.log_level = level
        if not 0 < self.port < 65536:
            bad("port", "expected 1-65535")
        for key in ("gateways", "exdriver_workers"):
            if getattr(self, key) < (0 if key == "gateways" and self.join else 1):
                bad(key, "expected at least 1")
        self._validate_hosts(bad, problems)
        if self.maxconnections < 0:
            bad("maxconnections", "expected 0 (unlimited) or more")
        if len(self.local_socket.encode()) > 100:  # sun_path holds 108 bytes, the abstract NUL one
            bad("local_socket", "expected a path of at most 100 bytes")
        if len(self.server_device) > 64 or not self.server_device.isprintable() or \
                self.server_device != self.server_device.strip():
            bad("server_device", "expected a device name (printable, at most 64 characters, no "
                                 "spaces around it), or \"\" for none")
        if self.max_connections_per_address < 0:
            bad("max_connections_per_address", "expected 0 (unlimited) or more")
        try:
            self.access_policy()
        except ValueError as exc:
            problems.append(str(exc))
        for key in ("blob_drop_mb", "client_max_mb", "client_max_element_mb", "gateway_max_partial_mb",
                    "driver_queue_mb", "driver_max_element_mb", "hang_timeout", "driver_unfinished_timeout",
                    "worker_liveness", "host_heartbeat"):
            if not getattr(self, key) > 0:
                bad(key, "expected a number above 0")
        try:
            socket.getaddrinfo(self.host or None, self.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                               socket.AI_PASSIVE)
        except (OSError, UnicodeError) as exc:
            bad("host", f"cannot resolve host {self.host!r} ({getattr(exc, 'strerror', None) or exc})")
        for i, driver in enumerate(self.drivers):
            where = self.sources.get(f"driver[{i}]", f"driver {driver.name or driver.argv[0]!r}")
            for key, value in {**self.restart, **driver.restart}.items():
                if isinstance(value, int | float) and value < 0:
                    problems.append(f"{where}: restart.{key}: {value}: expected 0 or more")
            if check_executables and not driver.may_appear_later and shutil.which(driver.argv[0]) is None:
                problems.append(f"{where}: executable {driver.argv[0]!r} not found on PATH "
                                f"(say may_appear_later = true if it is installed later)")
        if problems:
            raise ConfigError("\n".join(problems))

    def _validate_hosts(self, bad: Any, problems: list[str]) -> None:
        """The host endpoint and the join setting: endpoints, names and key files."""
        for key in ("hosts_endpoint", "join"):
            value = getattr(self, key)
            if value is not None and not value.startswith("tcp://"):
                bad(key, "expected tcp://ADDRESS:PORT")
            if value is not None and not self.keys:
                bad(key, "needs keys (the key directory: see docs/hosts.md)")
        if self.hosts_endpoint and self.join:
            bad("join", "a server either serves hosts or joins one, not both")
        if self.join and not valid_host_name(self.host_name):
            bad("host_name", "expected this host's key name (letters, digits, '.', '_', '-')")
            return
        try:
            if self.hosts_endpoint and self.keys:
                HostKeys.load(self.keys)
            link = self.join_link()
            if link is not None and self.keys:
                link.check()
        except ConfigError as exc:
            problems.append(str(exc))

    def assign_names(self) -> None:
        taken: set[str] = set()
        for driver in self.drivers:
            if not driver.name:
                driver.name = driver_name(driver.argv, driver.env, taken)
            elif driver.name in taken:
                raise ConfigError(f"two drivers are named {driver.name!r}")
            taken.add(driver.name)
        for i, remote in enumerate(self.remotes):
            remote.name = remote.name or f"remote-{i}"


def driver_name(argv: list[str], env: dict[str, str], taken: set[str]) -> str:
    """INDIDEV (indiserver's -n), else a Python driver's attribute, else the program's name; made
    unique with -2, -3... (two drivers may run the same program or factory)."""
    from indibroker.workers.pydriver import spec_in

    spec = spec_in(argv)
    base = env.get("INDIDEV") or (spec.rpartition(":")[2] if spec else os.path.basename(argv[0]))
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


_SCALARS = {f.name: f for f in dataclasses.fields(Config)
            if f.name not in ("drivers", "remotes", "restart", "sources", "write_rules")}
_RESTART_KEYS = {f.name: f.type for f in dataclasses.fields(RestartPolicy)}


def _check_type(where: str, value: Any, kind: str) -> Any:
    expected: dict[str, tuple[type, ...]] = {
        "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "str | None": (str,),
        "list[str]": (list,),
    }
    if kind == "list[str]" and isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    types = expected.get(kind, (object,))
    if isinstance(value, bool) and kind in ("int", "float"):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{where}: expected {kind.replace(' | None', '')}, got {value!r}")
    return value


def _restart_table(where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    for key, value in table.items():
        if key not in _RESTART_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(_RESTART_KEYS))})")
        _check_type(f"{where}.{key}", value, str(_RESTART_KEYS[key]))
    return dict(table)


def load_toml(path: str | Path, config: Config | None = None) -> Config:
    """Read a TOML config file into `config` (or a fresh one)."""
    config = config or Config()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for key, value in data.items():
        where = f"{path}: {key}"
        if key == "restart":
            config.restart = _restart_table(where, value)
        elif key == "write_rules":
            if not isinstance(value, dict) or not all(
                    isinstance(v, list) and all(isinstance(n, str) for n in v) for v in value.values()):
                raise ConfigError(f"{where}: expected a table of device = [networks]")
            config.write_rules = {str(k): list(v) for k, v in value.items()}
            config.sources["write_rules"] = str(path)
        elif key == "driver":
            if not isinstance(value, list):
                raise ConfigError(f"{where}: expected [[driver]] tables")
            for i, table in enumerate(value):
                config.sources[f"driver[{len(config.drivers)}]"] = f"{path}: driver[{i}]"
                config.drivers.append(_driver_table(f"{path}: driver[{i}]", table))
        elif key == "remote":
            if not isinstance(value, list):
                raise ConfigError(f"{where}: expected [[remote]] tables")
            for i, table in enumerate(value):
                config.remotes.append(_remote_table(f"{path}: remote[{i}]", table))
        elif key in _SCALARS:
            setattr(config, key, _check_type(where, value, str(_SCALARS[key].type)))
            config.sources[key] = str(path)
        else:
            raise ConfigError(f"{where}: unknown key")
    return config


def _remote_table(where: str, table: Any) -> RemoteConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    kinds = {"host": "str", "port": "int", "device": "str", "blob_enable": "bool", "name": "str",
             "snoop_up": "bool"}
    for key, value in table.items():
        if key not in kinds:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(kinds))})")
        _check_type(f"{where}.{key}", value, kinds[key])
    if "host" not in table:
        raise ConfigError(f"{where}.host: missing")
    return RemoteConfig(**table)


def _driver_table(where: str, table: Any) -> DriverConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    known = {"command", "python", "name", "env", "restart", "snoop_messages", "may_appear_later"}
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
    if ("command" in table) == ("python" in table):
        raise ConfigError(f"{where}: give exactly one of command (an executable) or python (module:attr)")
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"{where}.env: expected a table of strings")
    name = _check_type(f"{where}.name", table.get("name", ""), "str")
    restart = _restart_table(f"{where}.restart", table.get("restart", {}))
    if "python" in table:
        spec = _check_type(f"{where}.python", table["python"], "str")
        try:
            return DriverConfig.python(spec, name=name, env=dict(env), restart=restart)
        except ConfigError as exc:
            raise ConfigError(f"{where}.python: {exc}") from None
    command = table.get("command")
    if isinstance(command, str):
        argv = shlex.split(command)
    elif isinstance(command, list) and all(isinstance(a, str) for a in command):
        argv = list(command)
    else:
        raise ConfigError(f"{where}.command: expected a command line or a list of arguments")
    if not argv:
        raise ConfigError(f"{where}.command: empty")
    snoop_messages = _check_type(f"{where}.snoop_messages", table.get("snoop_messages", True), "bool")
    later = _check_type(f"{where}.may_appear_later", table.get("may_appear_later", False), "bool")
    return DriverConfig(argv=argv, name=name, env=dict(env), restart=restart, snoop_messages=snoop_messages,
                        may_appear_later=later)
