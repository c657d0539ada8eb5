"""CaseOps: a bijective case transform applied before tokenization (#1736 lineage, SPEC 4).

Over each maximal run of ASCII letters ("word"):
  all lowercase          -> unchanged
  all uppercase, len>=2  -> ALLCAPS + lowercase
  Titlecase              -> TITLE + lowercase
  other mixed case       -> [TITLE if the first letter is upper] + lowercase, with CAPNEXT before
                            every later uppercase letter
Literal control characters in the input are written ESC + char. Everything else is untouched.
`decode` inverts this and rejects any string that `encode` could not have produced.
"""
from __future__ import annotations

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CONTROLS = frozenset((TITLE, ALLCAPS, CAPNEXT, ESC))
MARKERS = (TITLE, ALLCAPS, CAPNEXT, ESC)  # tokenizer ids 4..7 in the published CaseOps model


class CaseOpsError(ValueError):
    """A string that is not a valid CaseOps encoding; the message says where and why."""


def _encode_word(w: str) -> str:
    low = w.lower()
    if w == low:
        return w
    if len(w) >= 2 and w == w.upper():
        return ALLCAPS + low
    if w[0].isupper() and w[1:] == low[1:]:
        return TITLE + low
    head = TITLE + low[0] if w[0].isupper() else low[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in w[1:])


_CONTROL_RE = re.compile("[\ue001-\ue004]")
# A maximal ASCII-letter run that contains an uppercase letter (runs without one are left alone).
_CASED_WORD_RE = re.compile("(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*")


def encode(text: str) -> str:
    text = _CONTROL_RE.sub(lambda m: ESC + m.group(), text)
    return _CASED_WORD_RE.sub(lambda m: _encode_word(m.group()), text)


def _decode_word(s: str, i: int, n: int) -> tuple[str, int]:
    """Decode one encoded word starting at s[i] (a marker or a lowercase letter)."""
    start, mode = i, None
    if s[i] in (TITLE, ALLCAPS):
        mode = s[i]
        i += 1
        if i >= n or not ("a" <= s[i] <= "z"):
            raise CaseOpsError(f"position {start}: {'TITLE' if mode == TITLE else 'ALLCAPS'} must be followed "
                               "by a lowercase ASCII letter")
    letters = []
    while i < n:
        c = s[i]
        if c == CAPNEXT:
            if i + 1 >= n or not ("a" <= s[i + 1] <= "z"):
                raise CaseOpsError(f"position {i}: CAPNEXT must be followed by a lowercase ASCII letter")
            if not letters:
                raise CaseOpsError(f"position {i}: CAPNEXT cannot start a word (TITLE marks a first capital)")
            if mode == ALLCAPS:
                raise CaseOpsError(f"position {i}: CAPNEXT inside an ALLCAPS word")
            letters.append(s[i + 1].upper())
            i += 2
        elif "a" <= c <= "z":
            letters.append(c.upper() if mode == ALLCAPS else c)
            i += 1
        elif "A" <= c <= "Z":
            raise CaseOpsError(f"position {i}: raw uppercase letter {c!r}; encoded text has none")
        elif c in (TITLE, ALLCAPS):
            raise CaseOpsError(f"position {i}: case marker inside a word")
        else:
            break
    if mode == TITLE:
        letters[0] = letters[0].upper()
    word = "".join(letters)
    if _encode_word(word) != s[start:i]:  # e.g. ALLCAPS on one letter, TITLE+CAPNEXT that should be ALLCAPS
        raise CaseOpsError(f"position {start}: non-canonical encoding {s[start:i]!r} of {word!r}")
    return word, i


def decode(s: str) -> str:
    out, i, n = [], 0, len(s)
    while i < n:
        c = s[i]
        if c == ESC:
            if i + 1 >= n or s[i + 1] not in CONTROLS:
                raise CaseOpsError(f"position {i}: ESC must be followed by a control character U+E001..U+E004")
            out.append(s[i + 1])
            i += 2
        elif c in (TITLE, ALLCAPS) or ("a" <= c <= "z"):
            word, i = _decode_word(s, i, n)
            out.append(word)
        elif c == CAPNEXT:
            raise CaseOpsError(f"position {i}: CAPNEXT outside a word")
        elif "A" <= c <= "Z":
            raise CaseOpsError(f"position {i}: raw uppercase letter {c!r}; encoded text has none")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def original_byte_weights(encoded: str) -> np.ndarray:
    """For every UTF-8 byte of `encoded`, how many bytes of the ORIGINAL text it stands for (0 or 1).
    Markers (and an escaping ESC) stand for nothing; every other byte stands for itself, because
    case changes map one ASCII byte to one ASCII byte."""
    b = np.frombuffer(encoded.encode("utf-8"), dtype=np.uint8)
    w = np.ones(b.size, dtype=np.int64)
    # U+E001..U+E004 encode as EE 80 81..84; 0xEE is always a lead byte, so this match is exact.
    starts = np.flatnonzero((b[:-2] == 0xEE) & (b[1:-1] == 0x80) & (b[2:] >= 0x81) & (b[2:] <= 0x84)) \
        if b.size >= 3 else np.array([], dtype=np.int64)
    literal_next = -1
    for p in starts.tolist():  # few per document; ESC makes the following control character literal
        if p == literal_next:
            continue
        w[p:p + 3] = 0
        if b[p + 2] == 0x84:
            literal_next = p + 3
    return w


def span_original_bytes(encoded: str, begins, ends) -> np.ndarray:
    """Original-text bytes inside each byte span [begin, end) of `encoded`'s UTF-8 (a token's surface as
    SentencePiece reports it). Markers and an escaping ESC count 0, an escaped literal its own 3 bytes,
    everything else its UTF-8 bytes; a span may be empty (the leading pieces of a byte-fallback run)."""
    w = original_byte_weights(encoded)
    cw = np.concatenate([[0], np.cumsum(w)])
    return cw[np.asarray(ends, dtype=np.int64)] - cw[np.asarray(begins, dtype=np.int64)]
