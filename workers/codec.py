"""The INDI XML stream codec every worker shares.

An INDI connection (TCP socket or a driver's stdout) carries a sequence of top-level XML elements
with no enclosing document. `StreamDecoder` cuts that byte stream into whole elements: a cheap
scanner finds element boundaries with `bytes.find` and a tag regex (a multi-MB base64 BLOB is
skipped in one C call), then each complete element is parsed once by lxml with entity resolution,
DTDs and network access off. The raw bytes of each element are kept so that they can be forwarded
unchanged: nothing downstream re-serialises XML.

INDI vectors do not nest, so a new top-level INDI element (one of `TOP_LEVEL_TAGS`) that begins
inside an unfinished one means the unfinished one was cut short (a driver died or botched a write
mid-element): the decoder reports that element as a fault and resumes at the new one, instead of
swallowing every later message while it waits for an end tag that never comes. An element left
unfinished for too long can be dropped with `StreamDecoder.abandon()` (the caller owns the clock).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lxml import etree

from indibroker.broker.errors import MalformedInput

__all__ = ["Element", "StreamDecoder", "DEFAULT_MAX_ELEMENT", "DEFAULT_MAX_DEPTH", "TOP_LEVEL_TAGS"]

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
# The elements that only ever stand at the top level of an INDI stream: one of these starting
# inside another element means that element was cut short.
TOP_LEVEL_TAGS = (
    "defTextVector", "defNumberVector", "defSwitchVector", "defLightVector", "defBLOBVector",
    "setTextVector", "setNumberVector", "setSwitchVector", "setLightVector", "setBLOBVector",
    "newTextVector", "newNumberVector", "newSwitchVector", "newBLOBVector",
    "delProperty", "message", "getProperties", "enableBLOB", "pingRequest", "pingReply",
)
_TOP_NAMES = frozenset(t.encode() for t in TOP_LEVEL_TAGS)
_TOP_ANY_NS = tuple("{*}" + t for t in TOP_LEVEL_TAGS)  # lxml tag filters: these names, any namespace
# Where a start tag of one of them begins. Spelt factored (the same names): the regex runs on every
# small element taken whole, and this form is a third faster there than a flat alternation.
_TOP = re.compile(
    rb"<(?:def(?:Text|Number|Switch|Light|BLOB)Vector|set(?:Text|Number|Switch|Light|BLOB)Vector"
    rb"|new(?:Text|Number|Switch|BLOB)Vector|delProperty|message|getProperties|enableBLOB|ping(?:Request|Reply))"
    rb"[\s/>]")
_TOP_LONGEST = max(map(len, _TOP_NAMES)) + 2  # the longest match of _TOP
_TOP_WINDOW = 4096  # a longer span is searched a window at a time, from one "<" (memchr) to the next
_NAME_AT = re.compile(rb"<(" + _NAME + rb")")
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


def _top_inside(buf: bytearray, start: int, end: int) -> re.Match[bytes] | None:
    """The first top-level INDI start tag in ``buf[start:end]``. Bytes only, so a comment or
    CDATA mentioning one counts too: callers use it to decline a fast path, and the careful scan
    (which steps over those) decides. A long span is searched a window at a time, each from the
    next ``<`` found by ``bytes.find`` (memchr): a BLOB's base64, which holds none, is crossed
    twenty times faster than by the regex, and markup dense with tags still costs one regex
    call per window, not one per tag."""
    if end - start <= _TOP_WINDOW:
        return _TOP.search(buf, start, end)
    lt = buf.find(b"<", start, end)
    while lt >= 0:
        stop = min(end, lt + _TOP_WINDOW)
        m = _TOP.search(buf, lt, stop)
        if m is not None or stop == end:
            return m
        lt = buf.find(b"<", stop - _TOP_LONGEST, end)  # windows overlap: no match falls between
    return None


_PARSER = _parser()  # one per process: lxml parsers are reusable, and each costs memory


class StreamDecoder:
    """Incremental decoder: `feed()` bytes, get back the elements completed so far.

    Raises `MalformedInput` on garbage between elements, bad tags, a DOCTYPE (the way in for
    entity bombs), nesting deeper than `max_depth`, an element larger than `max_element`, or a
    top-level INDI element (`TOP_LEVEL_TAGS`) starting inside another (INDI vectors do not nest:
    the outer one was cut short; in resync mode decoding resumes at the new element). After
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
        self.faults: list[str] = []  # what was skipped (resync mode) or abandoned, for the caller to log
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

    @property
    def pending_bytes(self) -> int:
        """Bytes held for input that is not yet a whole element: an unfinished element, or an
        unfinished start tag, declaration or comment before one; 0 between elements. The same
        count as `buffered`, under the name the callers that bound unfinished input use. A caller
        timing out half-sent input should test this rather than `in_element`, which is False while
        the element's own start tag is still unfinished."""
        return len(self._buf)

    def abandon(self, reason: str = "") -> int:
        """Drop whatever is held for an unfinished element (or start tag), for a caller that has
        waited long enough for its end: a driver that stopped mid-element. Records a fault
        ``unfinished <TAG> (N bytes) abandoned[: reason]`` in `faults` (in either mode: the caller
        chose this, nothing is raised) and returns N, the bytes dropped; 0, and no fault, when
        nothing was held. Decoding carries on with the next byte fed."""
        held = len(self._buf)
        if not held:
            return 0
        why = f": {reason}" if reason else ""
        self.faults.append(f"unfinished {self._held_what()} ({held} bytes) abandoned{why}")
        self._reset()
        return held

    def _held_what(self) -> str:
        """What the buffer holds, for a fault: ``<tag>`` of the element (or of its start tag)."""
        if self._open:
            return f"<{self._open[0].decode('ascii', 'replace')}>"
        m = _NAME_AT.match(self._buf)
        if m is not None:
            return f"<{m.group(1).decode('ascii', 'replace')}>"
        return f"input {bytes(self._buf[:20])!r}"

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
            if stack:
                top = _TOP.match(buf, lt)
                if top is not None:  # INDI vectors do not nest: the open element was cut short
                    self._resume = lt
                    new = top.group()[1:-1].decode()  # "<name" and the space, "/" or ">" after it
                    raise MalformedInput(
                        f"unfinished <{stack[0].decode('ascii', 'replace')}> ({lt - self._start} bytes) skipped: "
                        f"a new <{new}> began inside it")
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
        # What came before the unfinished element or tag (whitespace, declarations) can go, so
        # that what is held is exactly what `pending_bytes` reports.
        cut = self._start if self._start >= 0 else pos
        if cut:
            del buf[:cut]
            pos -= cut
            if self._start >= 0:
                self._start = 0
        self._scan = pos

    def _batch(self, out: list[Element], lt: int) -> bool:
        """The fastest path: the whole elements buffered from `lt` on, separated by whitespace
        only, parsed in one lxml call as the children of a wrapper (a flood's 200 small vectors
        per read cost one parse, not 200: lxml's set-up per document outweighs a small vector).
        It declines anything unusual (one element, markup such as comments, a parse error, too
        deep, a child count other than the scan's) and `_whole` then takes the elements
        one at a time, so what is accepted is exactly what the one-at-a-time path accepts. An
        element with a top-level tag inside ends the batch before it (not declined whole: that
        would parse the rest again for each element taken one at a time)."""
        buf = self._buf
        bounds: list[int] = []  # start, end, start, end, ...
        tops = 0  # how many of those elements have a top-level name (all of them, in INDI)
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
            tops += name in _TOP_NAMES
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
        # A top-level tag below the top level is a fault the careful scan reports. One C walk
        # finds the elements with a top-level name, in any namespace (so never fewer than the
        # bytes hold): just the batch's own (`tops`) means none is nested, and when every element
        # of the batch has such a name that walk has made their proxies already.
        found = list(root.iter(*_TOP_ANY_NS))
        if len(found) != tops:  # the bytes say which element holds one: the batch ends before it
            keep = 0
            while keep < len(raws) and _top_inside(buf, bounds[2 * keep] + 1, bounds[2 * keep + 1]) is None:
                keep += 1
            if not keep:
                return False
            del raws[keep:]
            last = bounds[2 * keep - 1]
        del buf[:last]
        out.extend(map(Element, raws, found if len(found) == len(raws) == tops else root))
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
        (say, that end tag sat in a comment), or a top-level tag appears inside (a fault, or only
        a comment mentioning one), the careful scan takes over."""
        buf = self._buf
        close = buf.find(b"</" + name, pos)
        if close < 0:
            return False
        m = _END.match(buf, close)
        if m is None or m.group(1) != name:
            return False
        end = m.end()
        if end - lt > self.max_element or _top_inside(buf, pos, close) is not None:
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
            inside = f" (unfinished <{self._open[0].decode('ascii', 'replace')}> dropped)" if self._open else ""
            raise MalformedInput(f"bad tag: {tail[:60]!r}{inside}")
