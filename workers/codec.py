"""The INDI XML stream codec every worker shares.

An INDI connection (TCP socket or a driver's stdout) carries a sequence of top-level XML elements
with no enclosing document. `StreamDecoder` cuts that byte stream into whole elements: a cheap
scanner finds element boundaries with `bytes.find` and a tag regex (a multi-MB base64 BLOB is
skipped in one C call), then each complete element is parsed once by lxml with entity resolution,
DTDs and network access off. The raw bytes of each element are kept so that they can be forwarded
unchanged: nothing downstream re-serialises XML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lxml import etree

from indibroker.broker.errors import MalformedInput

__all__ = ["Element", "StreamDecoder", "DEFAULT_MAX_ELEMENT", "DEFAULT_MAX_DEPTH"]

DEFAULT_MAX_ELEMENT = 256 * 1024 * 1024
DEFAULT_MAX_DEPTH = 8
_MAX_TAG = 64 * 1024  # a single start tag longer than this is not INDI

_NAME = rb"[A-Za-z_:][-\w.:]*"
_ATTRS = rb"(?:\s+[^\s=/<>\"']+\s*=\s*(?:\"[^\"<]*\"|'[^'<]*'))*"
_START = re.compile(rb"<(" + _NAME + rb")" + _ATTRS + rb"\s*(/?)>")
_END = re.compile(rb"</(" + _NAME + rb")\s*>")
_END_THEN_SPACE = re.compile(rb"(</(" + _NAME + rb")\s*>)[ \t\r\n]*")  # the tag, its name
# A start tag's extent, attributes unchecked (lxml checks them): twice as fast as _START.
_HEAD = re.compile(rb"<(" + _NAME + rb")(?:[^>\"']++|\"[^\"]*+\"|'[^']*+')*+>")
_SLASH = 0x2F  # b"/"
# What an unfinished start or end tag may look like when the buffer ends inside it.
_PARTIAL = re.compile(
    rb"</?(?:" + _NAME + rb")?" + _ATTRS
    + rb"(?:\s+[^\s=/<>\"']*(?:\s*=\s*(?:\"[^\"<]*|'[^'<]*)?)?)?\s*/?\Z"
)
_WS = frozenset(b" \t\r\n")
_LT = 0x3C  # b"<"
MAX_BATCH = 256  # elements handed to lxml in one document


@dataclass(frozen=True, slots=True)
class Element:
    """One top-level INDI element: its exact bytes and its parsed tree."""

    raw: bytes
    root: etree._Element

    @property
    def tag(self) -> str:
        return str(self.root.tag)

    def get(self, key: str, default: str = "") -> str:
        return str(self.root.get(key, default))


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=True,  # our own size limit bounds elements; libxml2's 10 MB text cap would cut BLOBs
        remove_blank_text=False,
        recover=False,
    )


def _copy(buf: bytearray, start: int, end: int) -> bytes:
    """One copy of a slice (``bytes(buf[a:b])`` makes two: a multi-MB BLOB counts)."""
    with memoryview(buf) as view:
        return bytes(view[start:end])


_PARSER = _parser()  # one per process: lxml parsers are reusable, and each costs memory


class StreamDecoder:
    """Incremental decoder: `feed()` bytes, get back the elements completed so far.

    Raises `MalformedInput` on garbage between elements, bad tags, a DOCTYPE (the way in for
    entity bombs), nesting deeper than `max_depth` or an element larger than `max_element`. After
    an error the decoder has dropped what it buffered (the rest of that chunk included) and starts
    afresh with the next feed, so a caller that tolerates bad input (a driver) can keep feeding; a
    caller that does not (a client gateway) simply drops the connection.
    """

    __slots__ = ("max_element", "max_depth", "resync", "faults", "_resume", "_buf", "_scan", "_open",
                 "_start", "_parser", "_deep_probe")

    def __init__(self, max_element: int = DEFAULT_MAX_ELEMENT, max_depth: int = DEFAULT_MAX_DEPTH,
                 resync: bool = False):
        self.max_element = max_element
        self.max_depth = max_depth
        self.resync = resync  # skip bad input and go on (drivers), instead of raising (clients)
        self.faults: list[str] = []  # in resync mode: what was skipped, for the caller to log
        self._resume = -1  # where good input may start again after a fault (-1: nowhere held)
        self._buf = bytearray()
        self._scan = 0  # where scanning resumes
        self._open: list[bytes] = []  # names of the elements open in the current one
        self._start = -1  # offset of the current top-level element, -1 between elements
        self._parser = _PARSER
        self._deep_probe: etree.XPath | None = None

    @property
    def in_element(self) -> bool:
        """Inside an unfinished element (a big BLOB, typically)."""
        return self._start >= 0

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished element (what a half-sent message costs us)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Element]:
        """The elements completed by `data`. On bad input raises `MalformedInput`, whose
        `elements` holds those completed before the fault (they were good: deliver them)."""
        self._buf += data
        out: list[Element] = []
        while True:
            self._resume = -1
            try:
                self._run(out)
                return out
            except MalformedInput as exc:
                if not self.resync:
                    self._reset()
                    exc.elements = out
                    raise
                self.faults.append(str(exc))
                rest = self._buf[self._resume:] if self._resume >= 0 else b""
                self._reset()
                lt = rest.find(b"<")
                if lt < 0:
                    return out
                self._buf += rest[lt:]

    def _reset(self) -> None:
        self._buf.clear()
        self._scan = 0
        self._open.clear()
        self._start = -1

    def _run(self, out: list[Element]) -> None:
        buf = self._buf
        stack = self._open
        pos = self._scan
        while True:
            lt = buf.find(b"<", pos)
            if not stack:
                gap = buf[pos:] if lt < 0 else buf[pos:lt]
                if gap and not _WS.issuperset(gap):
                    self._resume = lt
                    raise MalformedInput(f"text outside an element: {bytes(gap[:40])!r}")
            if lt < 0:
                pos = len(buf)
                break
            pos = lt
            nxt = buf[lt + 1 : lt + 2]
            if not nxt:
                break
            if nxt == b"?" or nxt == b"!":
                end = self._skip_special(buf, lt)
                if end < 0:
                    break
                pos = end
                continue
            if nxt == b"/":
                m = _END.match(buf, lt)
                if m is None:
                    self._incomplete_or_bad(buf, lt)
                    break
                if not stack or stack.pop() != m.group(1):
                    self._resume = m.end()
                    raise MalformedInput(f"unexpected end tag {bytes(m.group(0)[:60])!r}")
                pos = m.end()
                if not stack:
                    self._emit(out, pos)
                    pos = 0
                continue
            m = _START.match(buf, lt)
            if m is None:
                self._incomplete_or_bad(buf, lt)
                break
            pos = m.end()
            if not stack and not m.group(2) and (self._batch(out, lt) or self._whole(out, lt, pos, m.group(1))):
                pos = 0  # emitted; the buffer now starts after them
                continue
            if not stack:
                self._start = lt
            if m.group(2):  # self-closing
                if not stack:
                    self._emit(out, pos)
                    pos = 0
                continue
            stack.append(bytes(m.group(1)))
            if len(stack) > self.max_depth:
                self._resume = pos
                raise MalformedInput(f"elements nested deeper than {self.max_depth}")
        # Waiting for more: what is held for the unfinished element (or tag) is bounded.
        pending = len(buf) - (self._start if self._start >= 0 else pos)
        if pending > self.max_element:
            raise MalformedInput(f"element larger than {self.max_element} bytes")
        if self._start < 0:
            # Between elements: whitespace and declarations already consumed can go.
            del buf[:pos]
            pos = 0
        self._scan = pos

    def _batch(self, out: list[Element], lt: int) -> bool:
        """The fastest path: the whole elements buffered from `lt` on, separated by whitespace
        only, parsed in one lxml call as the children of a wrapper (a flood's 200 small vectors
        per read cost one parse, not 200: lxml's set-up per document outweighs a small vector).
        It declines anything unusual (one element, markup such as comments, a parse error, too
        deep, a child count other than the scan's) and `_whole` then takes the elements
        one at a time, so what is accepted is exactly what the one-at-a-time path accepts."""
        buf = self._buf
        bounds: list[int] = []  # start, end, start, end, ...
        pos, size = lt, len(buf)
        while len(bounds) < 2 * MAX_BATCH:
            m = _HEAD.match(buf, pos)
            if m is None or buf[m.end() - 2] == _SLASH:  # a self-closing tag ends no span
                break
            name = m.group(1)
            close = buf.find(b"</" + name, m.end())
            # Nothing of the same name opens inside, so this end tag is the element's own.
            if close < 0 or buf.find(b"<" + name, m.end(), close) >= 0:
                break
            e = _END_THEN_SPACE.match(buf, close)
            if e is None or e.group(2) != name:
                break
            end = e.end(1)
            if end - pos > self.max_element:
                break
            bounds += (pos, end)
            pos = e.end()
            if pos >= size or buf[pos] != _LT:
                break
        if len(bounds) < 4:
            return False
        last = bounds[-1]
        if buf.find(b"<!", lt, last) >= 0 or buf.find(b"<?", lt, last) >= 0:
            return False  # comments, CDATA or instructions: the careful path knows them
        with memoryview(buf) as view:
            raws = [bytes(view[bounds[i]:bounds[i + 1]]) for i in range(0, len(bounds), 2)]
        try:
            root = etree.fromstring(b"".join((b"<_>", *raws, b"</_>")), self._parser)
        except etree.XMLSyntaxError:
            return False
        if len(root) != len(raws) or self._too_deep(root):
            return False
        del buf[:last]
        out.extend(map(Element, raws, root))
        return True

    def _too_deep(self, wrapper: etree._Element) -> bool:
        """An element below the wrapper nests deeper than `max_depth` (as `_depth` counts)."""
        probe = self._deep_probe
        if probe is None:
            probe = self._deep_probe = etree.XPath("boolean(" + "/".join(["*"] * (self.max_depth + 2)) + ")")
        return bool(probe(wrapper))

    def _whole(self, out: list[Element], lt: int, pos: int, name: bytes) -> bool:
        """The fast path: when the element's end tag is already buffered, hand the whole element
        to lxml (which checks everything inside) without scanning its children here. INDI
        vectors do not nest, so the first end tag of the same name closes it; if lxml disagrees
        (say, that end tag sat in a comment) the careful scan takes over."""
        buf = self._buf
        close = buf.find(b"</" + name, pos)
        if close < 0:
            return False
        m = _END.match(buf, close)
        if m is None or m.group(1) != name:
            return False
        end = m.end()
        if end - lt > self.max_element:
            return False  # let the careful scan report it
        raw = _copy(buf, lt, end)
        try:
            root = etree.fromstring(raw, self._parser)
        except etree.XMLSyntaxError:
            return False
        del buf[:end]
        if any(len(child) for child in root) and self._depth(root) > self.max_depth:
            self._resume = 0
            raise MalformedInput(f"elements nested deeper than {self.max_depth}")
        out.append(Element(raw, root))
        return True

    @staticmethod
    def _depth(root: etree._Element) -> int:
        """Nesting of elements that contain elements (a leaf adds none, as in the scan)."""
        deepest, stack = 0, [(root, 1)]
        while stack:
            el, depth = stack.pop()
            if len(el):
                deepest = max(deepest, depth)
                stack.extend((child, depth + 1) for child in el)
        return deepest

    def _emit(self, out: list[Element], end: int) -> None:
        buf = self._buf
        raw = _copy(buf, self._start, end)
        del buf[:end]
        self._start = -1
        self._resume = 0
        if len(raw) > self.max_element:
            raise MalformedInput(f"element larger than {self.max_element} bytes")
        try:
            root = etree.fromstring(raw, self._parser)
        except etree.XMLSyntaxError as exc:
            raise MalformedInput(f"malformed element: {exc}") from None
        out.append(Element(raw, root))

    def _skip_special(self, buf: bytearray, lt: int) -> int:
        """Step over `<?...?>`, `<!--...-->` and CDATA; refuse DOCTYPE. -1 means wait for more."""
        if buf.startswith(b"<?", lt):
            end = buf.find(b"?>", lt + 2)
            return -1 if end < 0 else end + 2
        if buf.startswith(b"<!--", lt):
            end = buf.find(b"-->", lt + 4)
            return -1 if end < 0 else end + 3
        if buf.startswith(b"<![CDATA[", lt):
            if not self._open:
                raise MalformedInput("CDATA outside an element")
            end = buf.find(b"]]>", lt + 9)
            return -1 if end < 0 else end + 3
        head = bytes(buf[lt : lt + 9])
        if b"<!--".startswith(head) or b"<![CDATA[".startswith(head):
            return -1  # too short to tell yet
        self._resume = lt + 1
        raise MalformedInput(f"markup not allowed in INDI: {head!r}")

    def _incomplete_or_bad(self, buf: bytearray, lt: int) -> None:
        tail = bytes(buf[lt : lt + _MAX_TAG + 1])
        if len(tail) > _MAX_TAG or _PARTIAL.match(tail) is None:
            self._resume = lt + 1
            raise MalformedInput(f"bad tag: {tail[:60]!r}")
