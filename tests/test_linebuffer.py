"""LineBuffer: lines out of arbitrary chunks, bounded."""

from hypothesis import given
from hypothesis import strategies as st

from indibroker.workers.linebuffer import LineBuffer


@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=20), st.data())
def test_any_chunking_gives_the_same_lines(lines, data):
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    buf, got, last = LineBuffer(), [], 0
    for cut in [*cuts, len(stream)]:
        got += buf.feed(stream[last:cut])
        last = cut
    assert got == lines and len(buf) == 0


def test_a_line_without_end_is_cut_at_the_bound():
    buf = LineBuffer(max_line=10)
    assert buf.feed(b"x" * 25) == [b"x" * 25]
    assert len(buf) == 0
    assert buf.feed(b"ab\ncd") == [b"ab"] and len(buf) == 2
