#!/usr/bin/env python3
"""A flooding INDI driver for benchmarks: speaks INDI XML on stdin/stdout, standard library only.

It defines one device (``--device``, else ``$INDIDEV``, else ``Flood1``) with four properties:

- ``SEQ``   (number, ro, member ``N``): the flood of small messages, ``N`` = 1, 2, 3, ...
- ``BLOB``  (BLOB, ro, member ``DATA``): the flood of BLOBs; the sequence number is in the vector's
  ``message`` attribute (``message="seq 7"``).
- ``START`` (number, rw, members ``COUNT`` and ``BLOBMB``): a client sets it to start a flood of
  ``COUNT`` messages, numbers when ``BLOBMB`` is 0, else BLOBs of ``BLOBMB`` MB each (COUNT=0 stops
  a flood under way). The driver answers ``START state="Busy"`` first and ``START state="Ok"`` once
  the flood is written, so a client knows that nothing more is coming.
- ``PING``  (number, rw, member ``T``): answered at once with a ``setNumberVector PING`` carrying
  the same value (a round-trip probe). ``pingRequest`` is answered with ``pingReply``.

Nothing is sent until asked: servers send ``getProperties`` at start, and the flood starts only
when a client sets START, so every client can connect first. The flood is written in big batches
with few system calls, while stdin stays served (a PING is answered between two batches).
``--start COUNT`` (with ``--blob-mb``) instead floods right after the first ``getProperties``: the
"no server" ceiling pipes this straight into a reader.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import select
import sys
import time
from collections import deque

BATCH = 1024  # small messages built per refill
LOW_WATER = 256 * 1024  # refill the output when less than this is waiting
MB = 1024 * 1024

_ELEMENT = re.compile(
    rb"<(getProperties|newNumberVector|newSwitchVector|newTextVector|newBLOBVector|pingRequest|"
    rb"pingReply|enableBLOB)\b([^>]*?)(?:/>|>(.*?)</\1\s*>)",
    re.S,
)
_ATTR = re.compile(rb"""([\w:-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_ONE_NUMBER = re.compile(rb"""<oneNumber\s+name\s*=\s*["']([^"']+)["'][^>]*>\s*([^<]*?)\s*</oneNumber\s*>""")


def xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def now_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


def attrs(text: bytes) -> dict[str, str]:
    return {m[1].decode(): (m[2] if m[2] is not None else m[3]).decode(errors="replace")
            for m in _ATTR.finditer(text)}


class Output:
    """Whole messages waiting for stdout, written with writev as the pipe or socket takes them."""

    def __init__(self, fd: int):
        self.fd = fd
        self.chunks: deque[bytes | memoryview] = deque()
        self.bytes = 0

    def push(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.bytes += len(data)

    def flush(self) -> None:
        while self.chunks:
            batch = [self.chunks[i] for i in range(min(64, len(self.chunks)))]
            try:
                n = os.writev(self.fd, batch)
            except (BlockingIOError, InterruptedError):
                return
            self.bytes -= n
            partial = n < sum(len(b) for b in batch)
            while n:
                head = self.chunks[0]
                if n >= len(head):
                    n -= len(head)
                    self.chunks.popleft()
                else:
                    self.chunks[0] = memoryview(head)[n:]
                    n = 0
            if partial:
                return  # the pipe took what it could: wait until it is writable again


class FloodDriver:
    def __init__(self, device: str, fd_in: int = 0, fd_out: int = 1):
        self.device = device
        self.dev = xml_escape(device).encode()
        self.fd_in = fd_in
        self.out = Output(fd_out)
        self.urgent: list[bytes] = []  # replies that go ahead of the next flood batch
        self.inbuf = b""
        self.remaining = 0  # messages of the flood still to build
        self.seq = 0
        self.blob_bytes = 0
        self.blob_cache: dict[int, bytes] = {}
        self.auto_start: tuple[int, float] | None = None
        self.start_members: dict[str, str] = {}
        self.eof = False
        stamp = b' state="Ok" timestamp="'
        self.num_head = b'<setNumberVector device="' + self.dev + b'" name="SEQ"' + stamp
        self.num_mid = b'"><oneNumber name="N">'
        self.num_tail = b"</oneNumber></setNumberVector>\n"

    # -- definitions ------------------------------------------------------------------------
    def definitions(self, name: str = "") -> list[bytes]:
        d, ts = self.dev.decode(), now_stamp()

        def number(vname: str, label: str, perm: str, members: list[tuple[str, str]]) -> str:
            timeout = ' timeout="0"' if perm == "rw" else ""
            body = "".join(f'<defNumber name="{m}" label="{lab}" format="%.0f" min="0" max="0" step="0">0'
                           "</defNumber>" for m, lab in members)
            return (f'<defNumberVector device="{d}" name="{vname}" label="{label}" group="Flood" '
                    f'state="Idle" perm="{perm}"{timeout} timestamp="{ts}">{body}</defNumberVector>\n')

        defs = {
            "SEQ": number("SEQ", "Sequence", "ro", [("N", "Sequence number")]),
            "BLOB": (f'<defBLOBVector device="{d}" name="BLOB" label="BLOB flood" group="Flood" '
                     f'state="Idle" perm="ro" timestamp="{ts}"><defBLOB name="DATA" label="Data"/>'
                     "</defBLOBVector>\n"),
            "START": number("START", "Start a flood", "rw", [("COUNT", "Messages"), ("BLOBMB", "BLOB MB")]),
            "PING": number("PING", "Round trip probe", "rw", [("T", "Token")]),
        }
        return [v.encode() for k, v in defs.items() if not name or k == name]

    def set_number(self, name: str, state: str, members: dict[str, str]) -> bytes:
        body = "".join(f'<oneNumber name="{xml_escape(k)}">{xml_escape(v)}</oneNumber>'
                       for k, v in members.items())
        return (f'<setNumberVector device="{self.dev.decode()}" name="{name}" state="{state}" '
                f'timestamp="{now_stamp()}">{body}</setNumberVector>\n').encode()

    # -- input --------------------------------------------------------------------------------
    def read_input(self) -> None:
        try:
            data = os.read(self.fd_in, 256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return
        buf = self.inbuf + data
        end = 0
        for m in _ELEMENT.finditer(buf):
            end = m.end()
            self.handle(m[1].decode(), attrs(m[2]), m[3] or b"")
        buf = buf[end:]
        if len(buf) > 64 * MB:  # something we do not understand and never ends: forget it
            buf = buf[-4096:]
        self.inbuf = buf

    def handle(self, tag: str, at: dict[str, str], body: bytes) -> None:
        device = at.get("device", "")
        if tag == "pingRequest":
            uid = xml_escape(at.get("uid", ""))
            self.urgent.append(f'<pingReply uid="{uid}"/>\n'.encode())
        elif tag == "getProperties":
            if not device or device == self.device:
                self.urgent.extend(self.definitions(at.get("name", "")))
                if self.auto_start is not None:
                    count, mb = self.auto_start
                    self.auto_start = None
                    self.start(count, mb)
        elif tag == "newNumberVector" and device == self.device:
            values = {m[1].decode(): m[2].decode(errors="replace") for m in _ONE_NUMBER.finditer(body)}
            name = at.get("name", "")
            if name == "PING":
                self.urgent.append(self.set_number("PING", "Ok", values))
            elif name == "START":
                try:
                    count = int(float(values.get("COUNT", "0")))
                    mb = float(values.get("BLOBMB", "0"))
                except ValueError:
                    self.urgent.append(self.set_number("START", "Alert", values))
                    return
                self.start(count, mb)

    def start(self, count: int, mb: float) -> None:
        self.remaining = max(0, count)
        self.seq = 0
        self.blob_bytes = int(mb * MB)
        members = {"COUNT": str(count), "BLOBMB": f"{mb:g}"}
        self.urgent.append(self.set_number("START", "Busy" if count > 0 else "Ok", members))
        self.start_members = members

    # -- output -------------------------------------------------------------------------------
    def blob_payload(self, size: int) -> bytes:
        if size not in self.blob_cache:
            self.blob_cache.clear()
            self.blob_cache[size] = base64.b64encode(os.urandom(size))
        return self.blob_cache[size]

    def refill(self) -> None:
        out = self.out
        if self.urgent:
            for data in self.urgent:
                out.push(data)
            self.urgent.clear()
        if not self.remaining or out.bytes >= LOW_WATER:
            return
        if self.blob_bytes:
            self.seq += 1
            self.remaining -= 1
            payload = self.blob_payload(self.blob_bytes)
            head = (f'<setBLOBVector device="{self.dev.decode()}" name="BLOB" state="Ok" '
                    f'timestamp="{now_stamp()}" message="seq {self.seq}"><oneBLOB name="DATA" '
                    f'size="{self.blob_bytes}" format=".bin" enclen="{len(payload)}">').encode()
            out.push(head)
            out.push(payload)
            out.push(b"</oneBLOB></setBLOBVector>\n")
        else:
            n = min(BATCH, self.remaining)
            first = self.seq + 1
            self.seq += n
            self.remaining -= n
            head = self.num_head + now_stamp().encode() + self.num_mid
            tail = self.num_tail
            out.push(b"".join([head + b"%d" % s + tail for s in range(first, first + n)]))
        if not self.remaining:
            out.push(self.set_number("START", "Ok", self.start_members))

    def run(self, finish_on_eof: bool = False) -> int:
        """Serve until stdin ends; with `finish_on_eof`, write the flood under way out first."""
        os.set_blocking(self.out.fd, False)
        try:
            while True:
                self.refill()
                want_write = bool(self.out.chunks)
                if self.eof and not (finish_on_eof and want_write):
                    break
                readers = [] if self.eof else [self.fd_in]
                readable, writable, _ = select.select(readers, [self.out.fd] if want_write else [], [])
                if readable:
                    self.read_input()
                if writable:
                    self.out.flush()
            return 0
        finally:
            os.set_blocking(self.out.fd, True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", default=os.environ.get("INDIDEV") or "Flood1", help="device name")
    parser.add_argument("--start", type=int, metavar="COUNT", help="flood COUNT messages after the first "
                        "getProperties, without waiting for START")
    parser.add_argument("--blob-mb", type=float, default=0.0, help="with --start: BLOBs of this many MB")
    args = parser.parse_args()
    driver = FloodDriver(args.device)
    if args.start is not None:
        driver.auto_start = (args.start, args.blob_mb)
    try:
        return driver.run(finish_on_eof=args.start is not None)
    except (BrokenPipeError, KeyboardInterrupt):
        return 0


if __name__ == "__main__":
    sys.exit(main())
