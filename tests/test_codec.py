"""StreamDecoder: cuts an INDI byte stream into whole elements, however chunked; refuses bad input."""

from __future__ import annotations

import base64
import os
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from indibroker.broker.errors import MalformedInput
from indibroker.workers.codec import StreamDecoder

D = "device='CCD Simulator'"
TS = "timestamp='2024-01-02T03:04:05'"
B64 = base64.encodebytes(bytes(range(256)) * 2).decode()  # base64 with a line break every 76 chars

# Every INDI 1.7 element (and ping), as drivers and clients really write them: multi-line, indented.
CATALOGUE = [
    "<getProperties version='1.7'/>",
    f"<getProperties version='1.7' {D}/>",
    f"<getProperties version=\"1.7\" {D} name='CCD_EXPOSURE'/>",
    f"<enableBLOB {D}>Also</enableBLOB>",
    f"<enableBLOB {D} name='CCD1'>Only</enableBLOB>",
    f"<newTextVector {D} name='T' {TS}>\n  <oneText name='X'>a &lt; b &amp; c > d</oneText>\n"
    "</newTextVector>",
    f"<newNumberVector {D} name='CCD_EXPOSURE'>\n  <oneNumber name='V'>\n1.5\n  </oneNumber>\n"
    "</newNumberVector>",
    f"<newSwitchVector {D} name='CONNECTION'><oneSwitch name='CONNECT'>On</oneSwitch>"
    "<oneSwitch name='DISCONNECT'>Off</oneSwitch></newSwitchVector>",
    f"<newBLOBVector {D} name='UP'>\n<oneBLOB name='B' size='512' format='.fits'>\n{B64}</oneBLOB>\n"
    "</newBLOBVector>",
    f"<defTextVector {D} name='INFO' label='Info &gt; x' group='M' state='Idle' perm='ro' timeout='0' {TS}>"
    "\n  <defText name='A' label='A'>text</defText>\n  <defText name='B' label='B'/>\n</defTextVector>",
    f"<defNumberVector {D} name='N' label='N' group='G' state='Ok' perm='rw' timeout='60'>\n"
    "  <defNumber name='V' label='V' format='%6.2f' min='0' max='3600' step='1'>\n 1\n  </defNumber>\n"
    "</defNumberVector>",
    f"<defSwitchVector {D} name='S' label='S' group='G' state='Idle' perm='rw' rule='OneOfMany'>"
    "<defSwitch name='ON' label='On'>On</defSwitch><defSwitch name='OFF' label='Off'>Off</defSwitch>"
    "</defSwitchVector>",
    f"<defLightVector {D} name='L' label='L' group='G' state='Alert'>"
    "<defLight name='L1' label='1'>Busy</defLight></defLightVector>",
    f"<defBLOBVector {D} name='CCD1' label='Image' group='G' state='Idle' perm='ro'>"
    "<defBLOB name='CCD1' label='Image'/></defBLOBVector>",
    f"<setTextVector {D} name='INFO' state='Ok' {TS}><oneText name='A'>x</oneText></setTextVector>",
    f"<setNumberVector {D} name='N' state='Busy' timeout='1'><oneNumber name='V'>2.5e3</oneNumber>"
    "</setNumberVector>",
    f"<setSwitchVector {D} name='S' state='Ok'><oneSwitch name='ON'>Off</oneSwitch></setSwitchVector>",
    f"<setLightVector {D} name='L' state='Ok'><oneLight name='L1'>Ok</oneLight></setLightVector>",
    f"<setBLOBVector {D} name='CCD1' state='Ok'>\n<oneBLOB name='CCD1' size='512' format='.fits'>\n"
    f"{B64}</oneBLOB>\n</setBLOBVector>",
    f"<delProperty {D} name='N' {TS}/>",
    f"<delProperty {D}/>",
    f"<message {D} {TS} message='quoted \"x\" &amp; &lt;y&gt; then /> and >'/>",
    "<message message=\"it's global\"/>",
    "<pingRequest uid='42'/>",
    "<pingReply uid='42'/>",
]
ELEMENTS = [e.encode() for e in CATALOGUE]
SEPARATORS = [b"", b"\n", b" \t\r\n", b"<?xml version='1.0'?>",
              b"\n<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n", b"<!-- between <a> -->\n"]
STREAM = b"\n".join(b"<?xml version='1.0'?>" + e for e in ELEMENTS) + b"\n"


def decode(chunks, **kw) -> list:
    dec = StreamDecoder(**kw)
    out = []
    for chunk in chunks:
        out += dec.feed(chunk)
    assert dec.buffered == 0
    return out


def split(data: bytes, cuts) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@pytest.mark.parametrize("text", CATALOGUE, ids=lambda t: t[1:t.index(" ") if " " in t else -2])
def test_each_element_round_trips(text):
    raw = text.encode()
    (el,) = decode([raw])
    assert el.raw == raw
    assert el.tag == text[1:].split(None, 1)[0].rstrip("/>")
    if "device=" in text:
        assert el.get("device") == "CCD Simulator"
    assert el.get("absent", "dflt") == "dflt"


def test_attribute_values_and_blob_text_are_parsed():
    by_tag = {}
    for el in decode([STREAM]):
        by_tag.setdefault(el.tag, el)
    assert by_tag["message"].get("message") == 'quoted "x" & <y> then /> and >'
    assert by_tag["newTextVector"].root[0].text == "a < b & c > d"
    assert base64.b64decode(by_tag["setBLOBVector"].root[0].text) == bytes(range(256)) * 2
    assert by_tag["pingRequest"].get("uid") == "42"


def test_whole_stream_in_one_feed_and_byte_by_byte():
    assert [e.raw for e in decode([STREAM])] == ELEMENTS
    assert [e.raw for e in decode([STREAM[i:i + 1] for i in range(len(STREAM))])] == ELEMENTS


def test_split_at_every_byte_position():
    for i in range(len(STREAM) + 1):
        assert [e.raw for e in decode([STREAM[:i], STREAM[i:]])] == ELEMENTS, i


_VALUE_CHARS = st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Zl", "Zp"))
_values = st.lists(st.text(_VALUE_CHARS, max_size=4) | st.sampled_from([">", "/>", "'", '"', "&", "<"]),
                  max_size=6).map("".join)


def _attr(value: str) -> str:
    quote = '"' if '"' not in value else "'"
    esc = value.replace("&", "&amp;").replace("<", "&lt;")
    esc = esc.replace(quote, "&quot;" if quote == '"' else "&apos;")
    return quote + esc + quote


@st.composite
def elements(draw):
    """(raw bytes, tag, device attribute, member text) of a random INDI-like element."""
    tag = draw(st.sampled_from(["setTextVector", "defNumberVector", "message", "newBLOBVector", "pingReply"]))
    device = draw(_values)
    head = f"<{tag} device={_attr(device)} name={_attr(draw(_values))}"
    if draw(st.booleans()):
        return (head + draw(st.sampled_from(["/>", " />", "\n/>"]))).encode(), tag, device, None
    text = "".join(draw(st.lists(st.text(_VALUE_CHARS, max_size=4) | st.sampled_from(["\n", "]]>", "&", "<"]),
                                 max_size=8)))
    body = text.replace("&", "&amp;").replace("<", "&lt;").replace("]]>", "]]&gt;")
    comment = draw(st.sampled_from(["", "<!-- c > <x/> -->", "\n  "]))
    raw = f"{head}>{comment}<one name='m'>{body}</one>{comment}</{tag}>"
    return raw.encode(), tag, device, text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(elements(), st.sampled_from(SEPARATORS)), min_size=1, max_size=6),
       st.lists(st.integers(min_value=0), max_size=12))
def test_random_elements_any_chunking(items, cuts):
    stream = b"".join(sep + raw for (raw, *_), sep in items)
    out = decode(split(stream, cuts))
    assert b"".join(e.raw for e in out) == b"".join(raw for (raw, *_), _ in items)
    assert len(out) == len(items)
    for el, ((_raw, tag, device, text), _) in zip(out, items, strict=True):
        assert el.tag == tag
        assert el.get("device") == device
        if text is not None:
            assert (el.root.find("one").text or "") == text


def test_buffered_reports_a_half_sent_element():
    dec = StreamDecoder()
    assert dec.feed(b"\n  <setNumberVector device='d'") == []
    assert dec.buffered == len(b"<setNumberVector device='d'")
    assert dec.feed(b"><oneNumber name='x'>1") == []
    assert dec.buffered == len(b"<setNumberVector device='d'><oneNumber name='x'>1")
    assert [e.tag for e in dec.feed(b"</oneNumber></setNumberVector>\n\n")] == ["setNumberVector"]
    assert dec.buffered == 0


def test_five_megabyte_blob_in_64k_chunks_is_fast():
    payload = base64.encodebytes(os.urandom(3_800_000))
    raw = b"<setBLOBVector device='d' name='b'><oneBLOB name='b' size='1' format='.z'>" + payload + \
        b"</oneBLOB></setBLOBVector>"
    assert len(raw) > 5_000_000
    dec = StreamDecoder()
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(raw), 65536):
        out += dec.feed(raw[i:i + 65536])
    assert time.perf_counter() - t0 < 2.0
    assert len(out) == 1 and out[0].raw == raw and out[0].root[0].text == payload.decode()


# -- malformed input -----------------------------------------------------------------------------
MALFORMED = {
    "text garbage": [b"<a/>\n", b"hello world\n"],
    "binary garbage": [b"\x00\xff\xfe\x89PNG"],
    "garbage before element": [b"oops<a/>"],
    "stray end tag": [b"</a>"],
    "mismatched end tag": [b"<a><b>", b"</a>"],
    "doctype": [b"<!DOCTYPE x [<!ENTITY a \"aaaa\">]>"],
    "doctype split": [b"<!", b"DOCTYPE x>"],
    "entity bomb": [b"<!DOCTYPE lolz [<!ENTITY a \"aaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;\">]><x>&b;</x>"],
    "undefined entity": [b"<message message='x'>&a;</message>"],
    "undefined entity in attribute": [b"<message message='&a;'/>"],
    "unterminated quote then tag": [b"<a x='abc", b"def", b"<b/>"],
    "bad tag name": [b"<1a/>"],
    "bad attribute": [b"<a x=1/>"],
    "duplicate attribute": [b"<a x='1' x='2'/>"],
    "cdata outside element": [b"<![CDATA[x]]>"],
}


@pytest.mark.parametrize("chunks", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_raises_then_resynchronises(chunks):
    dec = StreamDecoder()
    with pytest.raises(MalformedInput):
        for chunk in chunks:
            dec.feed(chunk)
    assert dec.buffered == 0
    assert [e.raw for e in dec.feed(b"<pingRequest uid='1'/>\n")] == [b"<pingRequest uid='1'/>"]


def test_mismatched_end_tag_raises_on_arrival():
    dec = StreamDecoder()
    assert dec.feed(b"<a><b>") == []
    with pytest.raises(MalformedInput, match="</a>"):
        dec.feed(b"</a>")  # no more input is coming: it must not wait


def test_entities_are_never_expanded():
    (el,) = decode([b"<message message='&lt;&amp;&#65;'>&gt;</message>"])
    assert el.get("message") == "<&A" and el.root.text == ">"
    with pytest.raises(MalformedInput):
        StreamDecoder().feed(b"<x>&lol;</x>")


def test_unterminated_quote_waits_until_decidable():
    dec = StreamDecoder()
    assert dec.feed(b"<message message='a > b /> c") == []  # '>' and '/>' may be inside the value
    assert dec.feed(b" still going") == []
    assert dec.buffered > 0
    with pytest.raises(MalformedInput):
        dec.feed(b"x" * 70_000)  # no start tag is that long


def test_comments_inside_and_between():
    stream = b"<!-- hello world? no: <a> -->\n<a x='1'><!-- </a> --><b/><!----></a><!--x-->"
    (el,) = decode([stream[:9], stream[9:30], stream[30:]])
    assert el.raw == b"<a x='1'><!-- </a> --><b/><!----></a>"


def test_depth_limit():
    assert len(decode([b"<a><b><c/></b></a>"], max_depth=2)) == 1
    dec = StreamDecoder(max_depth=2)
    dec.feed(b"<a><b>")
    with pytest.raises(MalformedInput, match="deeper"):
        dec.feed(b"<c>")  # raised at the start tag, before any end


def test_size_limit_raises_while_incomplete():
    dec = StreamDecoder(max_element=1000)
    dec.feed(b"<setBLOBVector device='d'><oneBLOB>")
    with pytest.raises(MalformedInput, match="larger"):
        for _ in range(20):
            dec.feed(b"A" * 100)
    assert [e.tag for e in dec.feed(b"<a/>")] == ["a"]


def test_size_limit_is_inclusive():
    raw = b"<a>" + b"x" * 93 + b"</a>"
    assert len(raw) == 100
    assert [e.raw for e in decode([raw], max_element=100)] == [raw]
    with pytest.raises(MalformedInput):
        StreamDecoder(max_element=99).feed(raw)


def test_size_limit_ignores_what_follows_the_element():
    raw = b"<a>" + b"x" * 93 + b"</a>"
    assert [e.raw for e in decode([raw + b"\n" + raw + b"\n"], max_element=100)] == [raw, raw]


def test_size_limit_applies_inside_an_unfinished_start_tag():
    dec = StreamDecoder(max_element=1000)
    with pytest.raises(MalformedInput):
        dec.feed(b"<message message='" + b"x" * 5000)


def test_elements_before_an_error_are_not_lost():
    def valid(chunks):
        dec, out = StreamDecoder(), []
        for chunk in chunks:
            try:
                out += dec.feed(chunk)
            except MalformedInput as exc:
                out += exc.elements  # the contract: completed elements travel on the error
        return [e.raw for e in out]

    stream = b"<pingRequest uid='1'/>junk"
    assert valid([stream]) == valid([stream[:22], stream[22:]]) == [b"<pingRequest uid='1'/>"]


# -- many elements per parse ------------------------------------------------------------------------
# A read of a flood holds hundreds of small elements, parsed in one lxml call. These cases make sure
# that path cuts exactly where the one-at-a-time path does, whatever the nesting and the names.

_NAMES = ["a", "b", "ab"]


@st.composite
def trees(draw, depth: int = 0) -> str:
    """Any well-formed element, names repeated at every level, self-closing tags, text, comments."""
    name = draw(st.sampled_from(_NAMES))
    attr = draw(st.sampled_from(["", " x='1'", ' y="&lt;/a> b>"', " z='/>'"]))
    if depth >= 4 or draw(st.integers(0, 3)) == 0:
        if draw(st.booleans()):
            return f"<{name}{attr}/>"
        return f"<{name}{attr}>{draw(st.sampled_from(['', 't', '&lt;/a&gt;', ' ']))}</{name} >"
    parts = draw(st.lists(trees(depth + 1) | st.sampled_from(["txt", "\n", "<!-- </b> -->"]), max_size=4))
    return f"<{name}{attr}>{''.join(parts)}</{name}>"


@settings(max_examples=400, deadline=None)
# The first end tag of its name does not end an element that nests its own name.
@example([("<a><a></a>\n<b/></a>", b"\n"), ("<b></b>", b"")], [])
@given(st.lists(st.tuples(trees(), st.sampled_from([b"", b"\n", b" \n\t"])), min_size=1, max_size=12),
       st.lists(st.integers(min_value=0), max_size=6))
def test_nested_same_name_elements_are_cut_where_they_end(items, cuts):
    raws = [t.encode() for t, _ in items]
    stream = b"".join(sep + raw for raw, (_, sep) in zip(raws, items, strict=True))
    assert [e.raw for e in decode(split(stream, cuts))] == raws


def _flood(n: int, start: int = 0) -> list[bytes]:
    return [f"<setNumberVector device='F' name='SEQ'>\n <oneNumber name='N'>{i}</oneNumber>\n"
            "</setNumberVector>".encode() for i in range(start, start + n)]


def test_a_bad_element_amid_a_flood_costs_only_itself():
    good, later = _flood(300), _flood(300, 300)
    bad = b"<setNumberVector device='F' name='SEQ'><oneNumber name='N'>&bomb;</oneNumber></setNumberVector>"
    stream = b"\n".join(good + [bad] + later) + b"\n"
    dec = StreamDecoder(resync=True)
    out = dec.feed(stream)
    assert len(dec.faults) == 1
    assert [e.raw for e in out] == good + later
    assert [e.root[0].text for e in out[:3]] == ["0", "1", "2"]
    with pytest.raises(MalformedInput) as caught:
        StreamDecoder().feed(stream)  # a client's decoder: the error carries the good ones before it
    assert [e.raw for e in caught.value.elements] == good


def test_a_too_deep_element_amid_a_flood_is_refused():
    deep = b"<a>" * 10 + b"</a>" * 10
    with pytest.raises(MalformedInput, match="deeper"):
        StreamDecoder(max_depth=8).feed(b"\n".join(_flood(5) + [deep] + _flood(5)))
    ok = b"<a>" * 8 + b"<b/>" + b"</a>" * 8
    assert len(decode([b"\n".join(_flood(5) + [ok] + _flood(5))], max_depth=8)) == 11


def test_the_size_limit_holds_for_each_element_of_a_flood():
    small = _flood(3)
    big = b"<a>" + b"x" * 200 + b"</a>"
    with pytest.raises(MalformedInput, match="larger"):
        StreamDecoder(max_element=150).feed(b"\n".join(small + [big] + small))


# -- a truncated element does not swallow what follows it ---------------------------------------------
# INDI vectors do not nest: a top-level element starting inside an unfinished one means that one was
# cut short (a driver died or botched a write). It is a fault, and decoding resumes at the new one.

GOOD = [b"<setNumberVector device='D' name='N'><oneNumber name='X'>1</oneNumber></setNumberVector>",
        b"<message device='D' message='after the fault'/>",
        b"<setNumberVector device='D' name='N'><oneNumber name='X'>2</oneNumber></setNumberVector>"]
HALF = b"<defTextVector device='D' name='P' label='P' group='G' state='Idle' perm='ro'><defText name='T'>hel"
# Half elements cut outside a tag: (the bytes, the unfinished element's tag).
HALVES = [
    (HALF, "defTextVector"),
    (b"<setBLOBVector device='D' name='CCD1' state='Ok'>\n<oneBLOB name='CCD1' size='512' format='.fits'>\n"
     + B64[:200].encode(), "setBLOBVector"),
    (b"<defNumberVector device='D' name='N' label='N' group='G' state='Ok' perm='rw'>", "defNumberVector"),
    (b"<newSwitchVector device='D' name='S'><oneSwitch name='ON'>On</oneSwitch>", "newSwitchVector"),
    (b"<message device='D'>a message with text, cut", "message"),
    (b"<setNumberVector device='D' name='N'><oneNumber name='X'>", "setNumberVector"),
    (b"<newTextVector device='D' name='T'><oneText name='a'>x &lt;setNumberVector&gt; <!-- <message/> -->",
     "newTextVector"),
]


def _unfinished(tag: str, size: int, new: str) -> str:
    return f"unfinished <{tag}> ({size} bytes) skipped: a new <{new}> began inside it"


def test_a_half_element_does_not_swallow_the_good_messages_after_it():
    dec = StreamDecoder(resync=True)
    out = dec.feed(HALF + b"\n".join(GOOD) + b"\n")
    assert [e.raw for e in out] == GOOD
    assert dec.faults == [_unfinished("defTextVector", len(HALF), "setNumberVector")]
    assert dec.buffered == dec.pending_bytes == 0


def test_a_half_element_is_found_when_the_next_element_arrives_later():
    dec = StreamDecoder(resync=True)
    assert [e.raw for e in dec.feed(GOOD[0] + b"\n" + HALF)] == [GOOD[0]]
    assert dec.in_element and dec.faults == []
    assert dec.feed(b"\n<message device='D'") == []  # the new start tag, not finished yet
    assert dec.faults == [_unfinished("defTextVector", len(HALF) + 1, "message")]
    assert [e.raw for e in dec.feed(b" message='x'/>")] == [b"<message device='D' message='x'/>"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(HALVES), st.lists(st.sampled_from(ELEMENTS), max_size=3),
       st.lists(st.sampled_from(ELEMENTS), min_size=1, max_size=4), st.sampled_from(SEPARATORS),
       st.lists(st.integers(min_value=0), max_size=12))
def test_a_vector_opened_inside_an_unfinished_one_any_chunking(half, before, after, sep, cuts):
    raw, tag = half
    stream = b"\n".join(before) + b"\n" + raw + sep + b"\n".join(after) + b"\n"
    dec = StreamDecoder(resync=True)
    out = []
    for chunk in split(stream, cuts):
        out += dec.feed(chunk)
    assert [e.raw for e in out] == before + after
    new = after[0][1:].split(None, 1)[0].rstrip(b"/>").decode()
    assert dec.faults == [_unfinished(tag, len(raw + sep), new)]
    assert dec.buffered == 0


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([(b"<defTextVector device='D' name='P'><defText name='T",
                         "(unfinished <defTextVector> dropped)"),
                        (b"<defTextVector device='D' name='P", "<defTextVector device="),  # its own start tag
                        (b"<setNumberVector device='D'><oneNumber name='X'>1</oneNu",
                         "(unfinished <setNumberVector> dropped)")]),
       st.lists(st.integers(min_value=0), max_size=8))
def test_an_element_cut_inside_a_tag_any_chunking(half, cuts):
    raw, said = half
    dec = StreamDecoder(resync=True)
    out = []
    for chunk in split(b"<pingRequest uid='1'/>" + raw + b"\n".join(GOOD) + b"\n", cuts):
        out += dec.feed(chunk)
    assert [e.raw for e in out] == [b"<pingRequest uid='1'/>", *GOOD]
    assert len(dec.faults) == 1 and dec.faults[0].startswith("bad tag") and said in dec.faults[0]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(HALVES), st.lists(st.sampled_from(ELEMENTS), max_size=3),
       st.lists(st.integers(min_value=0), max_size=12))
def test_strict_a_vector_opened_inside_an_unfinished_one_is_a_fault(half, before, cuts):
    raw, tag = half
    stream = b"\n".join(before) + b"\n" + raw + b"\n".join(GOOD) + b"\n"
    dec = StreamDecoder()  # a client's: the first fault drops the client
    delivered = []
    with pytest.raises(MalformedInput, match=f"unfinished <{tag}>") as caught:
        for chunk in split(stream, cuts):
            delivered += dec.feed(chunk)
    delivered += caught.value.elements
    assert [e.raw for e in delivered] == before
    assert str(caught.value) == _unfinished(tag, len(raw), "setNumberVector")
    assert dec.faults == [] and dec.buffered == 0


@pytest.mark.parametrize("tag", ["defTextVector", "defNumberVector", "defSwitchVector", "defLightVector",
                                 "defBLOBVector", "setTextVector", "setNumberVector", "setSwitchVector",
                                 "setLightVector", "setBLOBVector", "newTextVector", "newNumberVector",
                                 "newSwitchVector", "newBLOBVector", "delProperty", "message", "getProperties",
                                 "enableBLOB", "pingRequest", "pingReply"])
@pytest.mark.parametrize("end", [" device='D'/>", "/>", ">x</{tag}>", "\n/>"])
def test_every_top_level_tag_ends_an_unfinished_element(tag, end):
    new = f"<{tag}{end.format(tag=tag)}".encode()
    for depth in (b"", b"<oneText name='a'>", b"<oneText name='a'><b>"):
        head = b"<newTextVector device='D' name='T'>" + depth
        dec = StreamDecoder(resync=True)
        assert [e.raw for e in dec.feed(head + new + b"\n")] == [new]
        assert dec.faults == [_unfinished("newTextVector", len(head), tag)]


def test_only_top_level_names_end_an_element():
    raws = [b"<defTextVector device='D' name='P'><defText name='T'>x</defText><defText name='U'/></defTextVector>",
            b"<setBLOBVector device='D' name='B'><oneBLOB name='B' size='0' format='.z'></oneBLOB></setBLOBVector>",
            b"<message device='D'><messages/><messageX/><message.x/><message-x>t</message-x>"
            b"<setNumberVector2/><defTextVectorX/><SetNumberVector/><oneText>&lt;setNumberVector </oneText></message>",
            b"<newTextVector device='D' name='T'><oneText name='a'><oneText name='b'>in</oneText></oneText>"
            b"</newTextVector>"]
    stream = b"\n".join(raws) + b"\n"
    for chunks in ([stream], [stream[i:i + 1] for i in range(len(stream))]):
        dec = StreamDecoder(resync=True)
        assert [e.raw for chunk in chunks for e in dec.feed(chunk)] == raws
        assert dec.faults == []


def test_abandon_drops_a_half_element():
    dec = StreamDecoder(resync=True)
    assert dec.abandon() == 0 and dec.faults == []  # nothing held: nothing to drop
    assert [e.raw for e in dec.feed(GOOD[0] + b"\n\n  " + HALF)] == [GOOD[0]]
    assert dec.in_element and dec.pending_bytes == dec.buffered == len(HALF)  # what precedes it is not held
    assert dec.abandon("no end tag for 10 s") == len(HALF)
    assert dec.faults == [f"unfinished <defTextVector> ({len(HALF)} bytes) abandoned: no end tag for 10 s"]
    assert not dec.in_element and dec.pending_bytes == 0 and dec.abandon() == 0
    # What the driver writes next is decoded afresh (the rest of the dropped element would be a fault).
    assert [e.raw for e in dec.feed(b"\n".join(GOOD))] == GOOD
    assert len(dec.faults) == 1


def test_abandon_drops_a_half_start_tag_and_works_in_strict_mode():
    dec = StreamDecoder()
    assert dec.feed(b"\n<defTextVector device='D' name='P") == []
    assert not dec.in_element  # its start tag is not finished: pending_bytes is what tells
    assert dec.pending_bytes == len(b"<defTextVector device='D' name='P")
    assert dec.abandon() == 33
    assert dec.faults == ["unfinished <defTextVector> (33 bytes) abandoned"]  # recorded, not raised
    dec.feed(b"<!-- a comm")
    assert dec.abandon() == 11 and dec.faults[-1] == "unfinished input b'<!-- a comm' (11 bytes) abandoned"
    assert [e.raw for e in dec.feed(GOOD[0])] == [GOOD[0]]


def test_pending_bytes_of_a_blob_in_chunks():
    (raw,) = (e for e in ELEMENTS if e.startswith(b"<setBLOBVector"))
    dec = StreamDecoder(resync=True)
    assert dec.feed(b"\n\n") == [] and dec.pending_bytes == 0
    held = 0
    while len(raw) - held > 100:
        assert dec.feed(raw[held:held + 100]) == []
        held += 100
        assert dec.in_element and dec.pending_bytes == held
    assert [e.raw for e in dec.feed(raw[held:] + b"\n")] == [raw]
    assert dec.pending_bytes == 0


# No false alarms: what is valid still comes out exactly as before, whatever the chunking, with no fault.
NO_ALARM = [
    f"<newTextVector {D} name='T'><oneText name='X'>&lt;setNumberVector device='D'&gt; &lt;message/></oneText>"
    "</newTextVector>",
    f"<message {D} message='&lt;setNumberVector name=\"x\"&gt;'/>",
    f"<message {D}>text &lt;defTextVector&gt; &lt;/message&gt;</message>",
    f"<setTextVector {D} name='T'><!-- <setNumberVector device='x'> --><oneText name='A'>x</oneText>"
    "</setTextVector>",
    f"<setTextVector {D} name='T'><oneText name='A'><![CDATA[<message device='x'/> <pingRequest>]]></oneText>"
    "</setTextVector>",
    f"<setTextVector {D} name='T'><?pi <setNumberVector> ?><oneText name='A'>y</oneText></setTextVector>",
    f"<defTextVector {D} name='P'><defText name='A'><defText name='B'>nested</defText></defText></defTextVector>",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(ELEMENTS + [e.encode() for e in NO_ALARM]) | trees().map(str.encode),
                          st.sampled_from(SEPARATORS)), min_size=1, max_size=10),
       st.lists(st.integers(min_value=0), max_size=10))
def test_valid_streams_raise_no_false_fault(items, cuts):
    stream = b"".join(sep + raw for raw, sep in items)
    dec = StreamDecoder(resync=True)
    out = []
    for chunk in split(stream, cuts):
        out += dec.feed(chunk)
    assert [e.raw for e in out] == [raw for raw, _ in items]
    assert dec.faults == [] and dec.buffered == 0
    assert [e.raw for e in decode(split(stream, cuts))] == [raw for raw, _ in items]  # strict: no raise


# Faulty nesting is judged the same by the fast paths (whole elements, batches) and the careful scan.
BAD_NESTING = [
    HALF,
    b"<defTextVector device='D' name='P'><message device='D' message='inside'/></defTextVector>",
    b"<setTextVector device='D' name='T'><oneText name='A'><setNumberVector device='D' name='N'>"
    b"<oneNumber name='X'>3</oneNumber></setNumberVector></oneText></setTextVector>",
    b"<message device='D'><pingRequest uid='1'/></message>",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ELEMENTS[:4] + GOOD + BAD_NESTING), min_size=1, max_size=12),
       st.lists(st.integers(min_value=0), max_size=10))
def test_faulty_nesting_is_judged_the_same_however_chunked(items, cuts):
    stream = b"\n".join([*items, GOOD[0]]) + b"\n"  # what ends a half element at the end

    def run(chunks):
        dec = StreamDecoder(resync=True)
        out = []
        for chunk in chunks:
            out += dec.feed(chunk)
        return [e.raw for e in out], dec.faults

    careful = run([stream[i:i + 1] for i in range(len(stream))])  # never a whole element buffered
    assert run([stream]) == run(split(stream, cuts)) == careful
    assert len(careful[1]) >= sum(raw in BAD_NESTING for raw in items)


def test_a_half_element_amid_a_flood_costs_only_itself():
    good, later = _flood(300), _flood(300, 300)
    nested = b"<setNumberVector device='F' name='SEQ'><oneNumber name='N'><message message='m'/></oneNumber>" \
        b"</setNumberVector>"
    for bad, faults in ((HALF, 1), (nested, 3)):  # the inner message is good; the two end tags are strays
        stream = b"\n".join(good + [bad] + later) + b"\n"
        dec = StreamDecoder(resync=True)
        out = [e.raw for e in dec.feed(stream)]
        assert len(dec.faults) == faults and dec.faults[0].startswith("unfinished <")
        assert out[:300] == good and out[-300:] == later
