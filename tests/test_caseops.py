"""The CaseOps transform (lossless_caps.py): bijective, canonical, byte weights."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lossless_caps as lc
ALPHABET = st.sampled_from(list("aAbBzZ xY.é😀\n") + list(lc.MARKERS))


@settings(max_examples=400, deadline=None)
@given(st.text(ALPHABET, max_size=40) | st.text(max_size=40))
def test_roundtrip_any_text(s):
    enc = lc.encode(s)
    assert lc.decode(enc) == s
    assert not any("A" <= c <= "Z" for c in enc)
    assert sum(lc.original_byte_weights(enc)) == len(s.encode("utf-8"))


@settings(max_examples=600, deadline=None)
@given(st.text(ALPHABET, max_size=30))
def test_decode_accepts_exactly_the_encodings(s):
    """Bijectivity: every string decode accepts is the encoding of its decoding."""
    try:
        d = lc.decode(s)
    except lc.CaseOpsError:
        return
    assert lc.encode(d) == s


@pytest.mark.parametrize("word,enc", [
    ("hello", "hello"), ("Hello", lc.TITLE + "hello"), ("NASA", lc.ALLCAPS + "nasa"), ("A", lc.TITLE + "a"),
    ("McDonald", lc.TITLE + "mc" + lc.CAPNEXT + "donald"), ("iPhone", "i" + lc.CAPNEXT + "phone"),
    ("x" + lc.TITLE, "x" + lc.ESC + lc.TITLE), ("Äb", "Äb"), ("AB1cD", lc.ALLCAPS + "ab1c" + lc.CAPNEXT + "d"),
])
def test_known_encodings(word, enc):
    assert lc.encode(word) == enc and lc.decode(enc) == word


@pytest.mark.parametrize("bad,why", [
    (lc.TITLE, "TITLE must be followed"), (lc.ALLCAPS + "a", "non-canonical"), (lc.CAPNEXT + "a", "CAPNEXT"),
    ("a" + lc.CAPNEXT, "CAPNEXT must be followed"), (lc.ESC + "a", "ESC"), ("Abc", "raw uppercase"),
    (lc.TITLE + "a" + lc.CAPNEXT + "b", "non-canonical"), ("a" + lc.TITLE + "b", "inside a word"),
    (lc.ALLCAPS + "a" + lc.CAPNEXT + "b", "ALLCAPS"),
])
def test_decode_rejects_malformed(bad, why):
    with pytest.raises(lc.CaseOpsError, match=why):
        lc.decode(bad)
