"""What a "word" is, once for the lexicon builder, the whole-word injection and its measurement.

A letter is a Unicode letter ([^\\W\\d_]: word characters minus digits and "_") with any
combining accents that NFC could not fold into it. A word is a run of letters with single
inner apostrophes (' or ’) or hyphens, so "o'er-the-weir" and "Brékkek-style" stay whole
while leading or trailing quotes and dashes, and double hyphens used as dashes, are not
part of any word. The look-arounds reject letter runs glued to digits or "_" ("4th",
"B52", "snake_case") outright instead of cutting a fragment out of them.

The pieces are spelt with literal characters (no \\u escapes) because wake2vec.tokens.whole_word
compiles the same definition in the tokenizers library's regex dialect (Oniguruma).
"""

from __future__ import annotations

import re

MARKS = "\u0300-\u036f"
LETTER = rf"[^\W\d_][{MARKS}]*"
# A word without its left look-behind, which each user states for its own scan.
WORD_CORE = rf"(?:{LETTER})+(?:[-'’](?:{LETTER})+)*(?![\w{MARKS}])"
WORD = re.compile(rf"(?<!\w){WORD_CORE}")


def word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every word of an already NFC-normalised `text`."""
    return [m.span() for m in WORD.finditer(text)]
