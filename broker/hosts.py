"""Hosts that join a central indibroker: keys, the authenticated TCP endpoint, the host's link.

A joined host's workers connect their DEALERs to the central broker over TCP with CURVE (each
side proves its key; the traffic is encrypted). The central broker serves them on a second
ROUTER (`HostEndpoint`), never on its ipc one, which stays unauthenticated and as fast as
before. Who may join is the set of public keys in ``KEYS/hosts/``: ZeroMQ asks our ZAP handler
(`ZapHandler`, on the broker's own event loop, no thread) about every CURVE handshake; a key we
do not list is refused there, a connection without CURVE fails the handshake, and neither ever
reaches routing. An accepted key's file name is the host's name: ZeroMQ stamps it as the
"User-Id" of every message that connection delivers, and the broker checks it against the host
part of the peer's identity (``host/role:name``), so a host cannot speak for another host or for
a local worker.

Key files are pyzmq's (`zmq.auth.create_certificates`): ``NAME.key`` (public) and
``NAME.key_secret`` (public and secret). The central server's KEYS holds ``server.key_secret``
and ``hosts/*.key``; a joining host's KEYS holds its own ``NAME.key_secret`` and ``server.key``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indibroker.broker.errors import ConfigError
from indibroker.broker.ratelog import RateLimitedLog

if TYPE_CHECKING:  # the config and the arbiter import this module: pyzmq only where sockets are
    import zmq

__all__ = ["make_keys", "HostKeys", "ZapHandler", "HostEndpoint", "JoinLink", "secure_client",
           "host_rows", "valid_host_name", "ENV_JOIN", "ZAP_DOMAIN", "SERVER"]

log = logging.getLogger(__name__)

ENV_JOIN = "INDIBROKER_JOIN"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"indibroker-hosts"
SERVER = "server"  # the central server's key name
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def valid_host_name(name: str) -> bool:
    """A host name is a key's file name and the first part of its workers' identities."""
    return bool(_NAME.match(name))


def make_keys(name: str, directory: str | Path) -> tuple[Path, Path]:
    """Write DIR/NAME.key and DIR/NAME.key_secret; never overwrite a key (ConfigError)."""
    import zmq.auth

    if not valid_host_name(name):
        raise ConfigError(f"key name {name!r}: letters, digits, '.', '_' and '-' only")
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{path} exists: remove it first to make a new key")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    made_public, made_secret = zmq.auth.create_certificates(directory, name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        public, private = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read key {path}: {exc}") from None
    if secret and not private:
        raise ConfigError(f"{path}: no secret key in it")
    return public, private


@dataclass(frozen=True)
class HostKeys:
    """The central server's keys: its own pair and the public keys of the hosts it accepts."""

    public: bytes
    secret: bytes
    hosts: dict[bytes, str]  # a host's public key (z85) -> its name

    @classmethod
    def load(cls, directory: str | Path) -> HostKeys:
        directory = Path(directory)
        public, secret = _load(directory / f"{SERVER}.key_secret", True)
        hosts: dict[bytes, str] = {}
        for path in sorted((directory / "hosts").glob("*.key")):
            if valid_host_name(path.stem):
                hosts[_load(path, False)[0]] = path.stem
            else:
                log.warning("host key %s ignored: its name is not a host name", path)
        assert secret is not None
        return cls(public, secret, hosts)


class ZapHandler:
    """ZeroMQ's authentication requests (ZAP, RFC 27) for the host endpoint, answered on the
    broker's loop: CURVE with a listed key is accepted as its host's name (the User-Id of what
    that connection sends), anything else refused and logged, at most once a minute per key."""

    def __init__(self, ctx: zmq.Context, keys: HostKeys):
        import zmq

        self.keys = keys
        self.refused = 0
        self._log = RateLimitedLog(log, 60.0)
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)

    def readable(self) -> None:
        import zmq

        for _ in range(64):
            try:
                request = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.sock.send_multipart(self.answer(request))

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The reply to one request: [version, id, status, text, user id, metadata]."""
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = request[:6]
        who = address.decode(errors="replace")
        if mechanism != b"CURVE" or domain != ZAP_DOMAIN or len(request) != 7:
            return self._refuse(request_id, who, f"mechanism {mechanism.decode(errors='replace')}")
        from zmq.utils import z85

        key = z85.encode(request[6])
        name = self.keys.hosts.get(key)
        if name is None:
            return self._refuse(request_id, who, f"unknown key {key.decode()} (not in hosts/)")
        log.info("host %s authenticated from %s", name, who)
        return [version, request_id, b"200", b"OK", name.encode(), b""]

    def _refuse(self, request_id: bytes, who: str, why: str) -> list[bytes]:
        self.refused += 1
        self._log.warning(("zap", who, why), "refused a host connection from %s: %s", who, why)
        return [b"1.0", request_id, b"400", why.encode(), b"", b""]

    def close(self) -> None:
        self.sock.close(linger=0)


class HostEndpoint:
    """The central broker's second ROUTER: TCP, CURVE server, ZAP required. Its monitor logs
    the handshakes that fail before ZAP is asked (a connection without CURVE)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys_dir: str, beat: float, hwm: int):
        import zmq

        self.endpoint = endpoint
        self.zap = ZapHandler(ctx, HostKeys.load(keys_dir))  # bound before the socket listens
        sock = self.sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a host's worker reconnecting takes its route back
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        _heartbeats(sock, beat)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.zap.keys.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        self._failures = RateLimitedLog(log, 60.0)
        self.monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            self.close()  # the ZAP endpoint too, so that a later attempt can bind it again
            raise

    def monitor_readable(self) -> None:
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        for _ in range(64):
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            kinds: dict[int, str] = {
                int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "protocol error (a connection without CURVE?)",
                int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "authentication refused",
                int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "handshake failed"}
            kind = kinds.get(int(event["event"]), "?")
            self._failures.warning(("handshake", kind), "refused a host connection on %s: %s (code %s)",
                                   self.endpoint, kind, event["value"])

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.zap.close()


def _heartbeats(sock: zmq.Socket, beat: float) -> None:
    """ZMTP heartbeats: a TCP link that went silent (a cable, a partition) is closed within three
    beats, so the DEALER reconnects and the ROUTER forgets the route."""
    import zmq

    ms = max(100, int(beat * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * ms)


@dataclass(frozen=True)
class JoinLink:
    """How a joined host's workers reach the central broker (told by their arbiter in the
    environment: it holds key file paths, never a key)."""

    endpoint: str  # tcp://ADDR:PORT of the central server's host endpoint
    host: str  # this host's name: its key's name, its workers' identity prefix
    keys: str  # directory with NAME.key_secret and server.key
    heartbeat: float

    def env(self) -> dict[str, str]:
        return {ENV_JOIN: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> JoinLink | None:
        value = os.environ.get(ENV_JOIN)
        return cls(**json.loads(value)) if value else None

    def check(self) -> None:
        """ConfigError unless both key files are there and readable."""
        _load(Path(self.keys) / f"{self.host}.key_secret", True)
        _load(Path(self.keys) / f"{SERVER}.key", False)


def secure_client(sock: zmq.Socket, link: JoinLink) -> None:
    """Make a DEALER a CURVE client of the central server, with ZMTP heartbeats and a connect
    timeout (a connection attempt into a partition is given up and retried, not left to the
    kernel's two minutes of SYN retries)."""
    import zmq

    keys = Path(link.keys)
    public, secret = _load(keys / f"{link.host}.key_secret", True)
    server, _ = _load(keys / f"{SERVER}.key", False)
    assert secret is not None
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server)
    _heartbeats(sock, link.heartbeat)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, max(500, int(link.heartbeat * 2000)))
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(1000, int(link.heartbeat * 2000)))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def host_rows(hosts: dict[str, Any]) -> list[dict[str, Any]]:
    """`indibroker status` rows for the joined hosts, from the broker's status file: one row per
    host (its link's state since when), then its workers and drivers as the host reports them.
    A host's report is a peer's word: every field is taken for the type it must have, or left
    out (the server device, in a gateway, builds INDI properties from these rows)."""
    rows: list[dict[str, Any]] = []
    for name, info in sorted(hosts.items()):
        rows.append({"role": "host", "name": name, "pid": None, "state": _text(info.get("link")) or "?",
                     "restarts": 0, "uptime": None, "cpu_percent": None, "rss": None, "last_exit": "",
                     "link": _text(info.get("link")), "link_since": _number(info.get("since")), "host": name})
        for worker in _list(info.get("workers")):
            if not isinstance(worker, dict):
                continue
            rows.append({"role": _text(worker.get("role")) or "worker", "name": f"{name}/{_text(worker.get('name'))}",
                         "pid": _number(worker.get("pid")), "state": "RUNNING", "restarts": 0,
                         "uptime": _number(worker.get("uptime")), "cpu_percent": _number(worker.get("cpu_percent")),
                         "rss": _number(worker.get("rss")), "last_exit": "", "host": name})
            for driver in _list(worker.get("drivers")):
                if isinstance(driver, dict):
                    rows.append({"role": "driver", "name": f"{name}/{_text(driver.get('name'))}",
                                 "pid": _number(driver.get("pid")), "state": _text(driver.get("state")),
                                 "restarts": _number(driver.get("restarts")) or 0,
                                 "uptime": _number(driver.get("uptime")),
                                 "cpu_percent": _number(driver.get("cpu_percent")), "rss": _number(driver.get("rss")),
                                 "devices": [d for d in _list(driver.get("devices")) if isinstance(d, str)],
                                 "last_exit": _text(driver.get("last_exit")), "host": name})
    return rows
