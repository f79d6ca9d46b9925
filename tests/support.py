"""Test support: run real servers (indibroker, indiserver) and talk to them over real sockets.

Everything waits on conditions with deadlines, never on fixed sleeps.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil

from indibroker.workers.codec import Element, StreamDecoder

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class RawClient:
    """A raw INDI client: a TCP socket (or, with `local`, the server's local socket, as libindi
    clients use it: BLOBs arrive as attached buffers, SCM_RIGHTS) and our own codec, every
    element kept in order."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", source: str | None = None,
                 local: str | None = None):
        """`source`: the local address to connect from (another loopback address, for access rules).
        `local`: the local socket's path (abstract namespace, as indiserver's `-u`)."""
        if local is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect("\0" + local)
        else:
            self.sock = socket.create_connection((host, port), timeout=5,
                                                 source_address=(source, 0) if source else None)
        self.local = local is not None
        self.fds: collections.deque[int] = collections.deque()  # buffers received, not yet bound
        self.attached: dict[int, list[bytes]] = {}  # element index -> its attached BLOBs' bytes
        self.sock.setblocking(False)
        self.decoder = StreamDecoder()
        self.elements: list[Element] = []
        self.arrivals: list[float] = []  # wall-clock time each element was read
        self.times: list[float] = []  # the same, on the monotonic clock
        self.closed = False
        self.received_bytes = 0

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)

    def pump(self, timeout: float = 0.05, first: bool = False) -> int:
        """Read what arrives within `timeout` (with `first`, stop at the first element that
        arrives); return the number of new elements."""
        import select

        before = len(self.elements)
        deadline = time.monotonic() + timeout
        while not self.closed:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.sock], [], [], max(0.0, remaining))
            if not ready:
                break
            try:
                if self.local:
                    data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 16)
                    self.fds.extend(fds)
                else:
                    data = self.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed = True
                break
            self.received_bytes += len(data)
            new = self.decoder.feed(data)
            if self.local:
                self._bind_buffers(new, len(self.elements))
            self.elements.extend(new)
            self.arrivals.extend([time.time()] * len(new))
            self.times.extend([time.monotonic()] * len(new))
            if first and len(self.elements) > before:
                break
        return len(self.elements) - before

    def _bind_buffers(self, new: list[Element], first: int) -> None:
        """Each attached oneBLOB takes the next buffer received, in document order (as libindi
        clients bind them); its `size` bytes are kept, the descriptor closed."""
        for i, el in enumerate(new):
            attached = [one for one in el.root if one.get("attached") == "true"]
            if el.tag != "setBLOBVector" or not attached:
                continue
            blobs = []
            for one in attached:
                assert self.fds, f"attached {one.get('name')} came without its buffer"
                fd = self.fds.popleft()
                try:
                    blobs.append(os.pread(fd, int(one.get("size")), 0))
                finally:
                    os.close(fd)
            self.attached[first + i] = blobs

    def blobs(self, index: int) -> list[bytes]:
        """The BLOBs of element `index` (a setBLOBVector), as bytes: its buffers' contents on
        the local socket, its base64 decoded on TCP."""
        if index in self.attached:
            return self.attached[index]
        return [base64.b64decode("".join((one.text or "").split())) for one in self.elements[index].root]

    def wait_for(self, pred: Callable[[Element], bool], timeout: float = 10.0, start: int = 0,
                 what: str = "element") -> Element:
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.elements):
                if pred(self.elements[index]):
                    return self.elements[index]
                index += 1
            if time.monotonic() > deadline:
                tags = [(e.tag, e.get("device"), e.get("name")) for e in self.elements[-5:]]
                raise AssertionError(f"timed out waiting for {what}; last seen {tags}")
            if self.closed:
                raise AssertionError(f"connection closed while waiting for {what}")
            self.pump(0.1)

    def wait_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self.pump(0.1)
        assert self.closed, "the server did not close the connection"

    def count(self, tag: str | None = None, device: str | None = None, name: str | None = None,
              start: int = 0) -> int:
        return sum(1 for e in self.elements[start:] if matches(e, tag, device, name))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        while self.fds:
            os.close(self.fds.popleft())


def matches(e: Element, tag: str | None = None, device: str | None = None, name: str | None = None) -> bool:
    return ((tag is None or e.tag == tag) and (device is None or e.get("device") == device)
            and (name is None or e.get("name") == name))


def is_(tag: str | None = None, device: str | None = None,
        name: str | None = None) -> Callable[[Element], bool]:
    return lambda e: matches(e, tag, device, name)


def member(e: Element, name: str) -> str:
    for child in e.root:
        if child.get("name") == name:
            return (child.text or "").strip()
    raise KeyError(name)


def fits_header(blob_el: Element) -> str:
    """The FITS header of a setBLOBVector's first BLOB (what a camera driver says it saw)."""
    import base64
    import zlib

    one = blob_el.root[0]
    data = base64.b64decode("".join((one.text or "").split()))
    if one.get("format", "").endswith(".z"):
        data = zlib.decompress(data)
    return data[:2880 * 4].decode("ascii", errors="replace")


def new_vector(kind: str, device: str, name: str, members: dict[str, str]) -> str:
    ones = "".join(f'<one{kind} name="{k}">{v}</one{kind}>' for k, v in members.items())
    return f'<new{kind}Vector device="{device}" name="{name}">{ones}</new{kind}Vector>'


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _name(proc: psutil.Process) -> str:
    """A process's name, or "" once it has gone (a driver that exits at once)."""
    try:
        return str(proc.name())
    except psutil.Error:
        return ""


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


class Broker:
    """`indibroker start` as a real subprocess, with its log kept for failures."""

    def __init__(self, *args: str, port: int | None = None, log_dir: Path | None = None,
                 runtime_dir: Path | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.args = list(args)
        self.log_path = (log_dir or Path("/tmp")) / f"indibroker-{self.port}.log"
        self.runtime_dir = runtime_dir
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.known: list[psutil.Process] = []

    @property
    def base_args(self) -> list[str]:
        args = ["--port", str(self.port)]
        if self.runtime_dir is not None:
            args += ["--runtime-dir", str(self.runtime_dir)]
        return args

    def start(self, wait: bool = True) -> Broker:
        self._log = open(self.log_path, "wb")
        env = dict(os.environ)
        env.update(self.env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "indibroker", "start", *self.base_args, *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        if wait:
            wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 20,
                       what="indibroker to listen")
            # The port listens from the start; gateways start accepting once the drivers are in.
            wait_until(lambda: self.proc.poll() is not None or any(
                _name(p).startswith("ib-gateway") for p in self.tree()), 20, what="indibroker's gateways")
            assert self.proc.poll() is None, f"indibroker exited early:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        extra = ["--port", str(self.port)]
        if self.runtime_dir is not None:
            extra += ["--runtime-dir", str(self.runtime_dir)]
        return subprocess.run([sys.executable, "-m", "indibroker", *args, *extra],
                              capture_output=True, text=True, timeout=timeout)

    def status(self) -> list[dict[str, Any]]:
        import json

        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def row(self, name: str) -> dict[str, Any]:
        for row in self.status():
            if row["name"] == name:
                return row
        raise KeyError(name)

    def tree(self) -> list[psutil.Process]:
        assert self.proc is not None
        procs = process_tree(self.proc.pid)
        for p in procs:
            if p.pid not in {k.pid for k in self.known}:
                self.known.append(p)
        return procs

    def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"indibroker did not stop within {timeout} s:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode

    def leftovers(self, timeout: float = 5) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        left = alive(self.known)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = alive(self.known)
        return left

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            for p in alive(self.known):
                with contextlib.suppress(psutil.Error):
                    p.kill()


class IndiServer:
    """The real indiserver from indi-bin, for comparisons and chaining."""

    def __init__(self, *drivers: str, port: int | None = None, extra: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.drivers = drivers
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> IndiServer:
        extra = self.extra if "-u" in self.extra else ("-u", f"/tmp/indiserver-test-{self.port}", *self.extra)
        self.proc = subprocess.Popen(["indiserver", "-p", str(self.port), *extra, *self.drivers],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_until(lambda: port_open(self.port), 15, what="indiserver to listen")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def getprop(port: int, *patterns: str, timeout: int = 3) -> dict[str, str]:
    """`indi_getprop` output as {"dev.prop.elem": value}."""
    result = subprocess.run(["indi_getprop", "-p", str(port), "-t", str(timeout), *patterns],
                            capture_output=True, text=True, timeout=timeout + 20)
    out = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def setprop(port: int, *assignments: str) -> None:
    result = subprocess.run(["indi_setprop", "-p", str(port), *assignments],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def clients(port: int, n: int) -> Iterator[list[RawClient]]:
    made = [RawClient(port) for _ in range(n)]
    try:
        yield made
    finally:
        for c in made:
            c.close()


# -- markers: make a negative check mean something ---------------------------------------------
_unique = itertools.count(1)


def unique(prefix: str = "marker") -> str:
    """A value no other marker of this run uses."""
    return f"{prefix}-{os.getpid()}-{next(_unique)}"


def ping(c: RawClient, timeout: float = 20.0) -> int:
    """Send a pingRequest and wait for its pingReply; return the index just past the reply.

    The server answers it itself, after everything the client sent before it, and queues the
    reply behind everything already queued for the client: once it is in, so is all of that."""
    uid = unique("ping")
    mark = len(c.elements)
    c.send(f'<pingRequest uid="{uid}"/>')
    reply = c.wait_for(lambda e: e.tag == "pingReply" and e.get("uid") == uid, timeout, start=mark,
                       what=f"pingReply {uid}")
    return c.elements.index(reply, mark) + 1


def mark_through(c: RawClient, device: str, vector: str, member_name: str, timeout: float = 30.0,
                 sender: RawClient | None = None) -> int:
    """A marker through a driver: set text member `member_name` of `device`'s `vector` to a value
    never used before (sent by `sender`, by default `c`) and wait until `c` gets the driver's
    setTextVector carrying it. Return the index just past that element in c.elements.

    The driver writes its answer after everything it wrote before, and that answer travels the
    same ordered path to `c` (driver, worker, broker, gateway, socket) as everything routed to `c`
    before it: once the marker is in, `c` has been sent all of that, so asserting that something
    from before it is absent means it was never sent."""
    value = unique()
    mark = len(c.elements)
    (sender or c).send(f'<newTextVector device="{device}" name="{vector}">'
                       f'<oneText name="{member_name}">{value}</oneText></newTextVector>')

    def carries(e: Element) -> bool:
        if e.tag != "setTextVector" or e.get("device") != device or e.get("name") != vector:
            return False
        try:
            return member(e, member_name) == value
        except KeyError:
            return False

    el = c.wait_for(carries, timeout, start=mark, what=f"marker {value} through {device}")
    return c.elements.index(el, mark) + 1


def wait_count(c: RawClient, n: int, tag: str | None = None, device: str | None = None,
               name: str | None = None, start: int = 0, timeout: float = 30.0, what: str = "") -> int:
    """Read until `c` holds `n` matching elements from `start` on; return the index just past the nth."""
    seen = 0

    def nth(e: Element) -> bool:
        nonlocal seen
        if matches(e, tag, device, name):
            seen += 1
        return seen >= n

    el = c.wait_for(nth, timeout, start=start, what=what or f"{n} x {tag} {device} {name}")
    return c.elements.index(el, start) + 1


# -- several hosts, one installation (docs/hosts.md) ------------------------------------------------
def make_host_keys(root: Path, central: str = "server", hosts: tuple[str, ...] = ("pier",),
                   listed: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Key directories as docs/hosts.md lays them out: root/central (server.key_secret and
    hosts/*.key of `listed`, by default every host) and root/NAME for each joining host (its
    NAME.key_secret and server.key)."""
    import shutil

    from indibroker.broker.hosts import make_keys

    dirs = {central: root / central}
    make_keys("server", dirs[central])
    (dirs[central] / "hosts").mkdir()
    for name in hosts:
        dirs[name] = root / name
        public, _ = make_keys(name, dirs[name])
        shutil.copy(dirs[central] / "server.key", dirs[name])
        if listed is None or name in listed:
            shutil.copy(public, dirs[central] / "hosts")
    return dirs


class Joined(Broker):
    """`indibroker join` as a real subprocess (in network namespace `netns` if given): the host's
    runtime directory is its own; with `port`, it runs a gateway for local clients."""

    def __init__(self, endpoint: str, keys: Path, name: str, *args: str, port: int | None = None,
                 log_dir: Path | None = None, runtime_dir: Path | None = None, netns: str | None = None,
                 env: dict[str, str] | None = None):
        # Without a gateway the instance is still named by a port: the default one (7624).
        super().__init__(*args, port=port or 7624, log_dir=log_dir, runtime_dir=runtime_dir, env=env)
        self.gateway = port is not None
        self.endpoint, self.keys, self.name, self.netns = endpoint, keys, name, netns
        self.log_path = (log_dir or Path("/tmp")) / f"indibroker-join-{name}-{self.port}.log"

    def start(self, wait: bool = True) -> Joined:
        self._log = open(self.log_path, "wb")
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        port = ["--port", str(self.port)] if self.gateway else []
        runtime = ["--runtime-dir", str(self.runtime_dir)] if self.runtime_dir else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "indibroker", "join", self.endpoint, "--keys", str(self.keys),
             "--name", self.name, *port, *runtime, *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(self.env or {})})
        if wait:
            wait_until(lambda: self.proc.poll() is not None or any(
                _name(p).startswith("ib-exdriver") for p in self.tree()), 20, what="the joined host's workers")
            assert self.proc.poll() is None, f"indibroker join exited early:\n{self.log()}"
        return self

    def drivers(self) -> dict[str, int]:
        """Driver name -> pid, from the host's own `indibroker status`."""
        return {r["name"]: r["pid"] for r in self.status() if r["role"] == "driver"}


class Netns:
    """A network namespace joined to ours by a veth pair: a second host on this machine whose
    link the test can cut (both ends down) and heal. `available()` says whether we may."""

    def __init__(self) -> None:
        n = os.getpid() % 200 + 20
        self.name = f"ib-host-{os.getpid()}"
        self.outer, self.inner = f"vib{os.getpid() % 100000}a", f"vib{os.getpid() % 100000}b"
        self.central_ip, self.host_ip = f"10.219.{n}.1", f"10.219.{n}.2"

    @staticmethod
    def available() -> bool:
        name = f"ib-probe-{os.getpid()}"
        ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return ok

    def _ip(self, *args: str, ns: bool = False) -> None:
        cmd = ["ip", "netns", "exec", self.name, "ip", *args] if ns else ["ip", *args]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr}"

    def __enter__(self) -> Netns:
        self._ip("netns", "add", self.name)
        self._ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        self._ip("link", "set", self.inner, "netns", self.name)
        self._ip("addr", "add", f"{self.central_ip}/24", "dev", self.outer)
        self._ip("addr", "add", f"{self.host_ip}/24", "dev", self.inner, ns=True)
        self._ip("link", "set", "lo", "up", ns=True)
        self.heal()
        return self

    def cut(self) -> None:
        self._ip("link", "set", self.outer, "down")

    def heal(self) -> None:
        self._ip("link", "set", self.outer, "up")
        self._ip("link", "set", self.inner, "up", ns=True)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
