"""(Wake word, English source word) pairs, and how each side maps to a row of the table.

Neighbour quality is judged by where a coinage's English source lands among its cosine
neighbours in the base vocabulary ("misunderstord" should sit near "misunderstood"). The
rank itself is `metrics.source_ranks`; this module decides which pairs are asked about:

* **Built-in pairs** (`data/source_pairs.txt`): transparent coinages of the Wake, checked
  by hand against the text.
* **Edit-distance pairs** (`edit_distance_pairs`): found mechanically against the base
  vocabulary by the rule below, so the metric covers hundreds of words without anyone
  choosing them.
* **A user's pairs file** (`read_pairs`, the `--pairs` flag): the same format as the
  built-in file.

How a word maps to a row (`resolve_pairs`): the Wake word is its injected token, an id at
or above the base vocabulary size whose token string is the word itself (after a leading
word-start marker, which `convert_ids_to_tokens` shows for Llama's added tokens). The English word
is its single whole-word base token, the word with the tokenizer's word-start marker
("▁misunderstood" for SentencePiece/Llama, "Ġmisunderstood" for byte-level BPE). A pair
whose English word has no such token is skipped and counted, not approximated by the mean
of its pieces: the mean of pieces is no row of the base vocabulary, so "its rank among the
base rows" would compare a synthetic vector with real ones. Likewise a Wake word that is
not a new token (a lexicon word that was already a base piece, or one missing from the
tokenizer) is skipped and counted.
"""

from __future__ import annotations

import collections
import pathlib
import re
from typing import Callable, Iterable, NamedTuple, Sequence

from wake2vec.errors import UserError

BUILTIN_PAIRS_FILE = pathlib.Path(__file__).resolve().parent / "data" / "source_pairs.txt"

# Word-start markers of whole-word tokens: SentencePiece (Llama) and byte-level BPE (GPT-2 style).
WORD_START_MARKERS = ("▁", "Ġ")

# The edit-distance rule (BUILD.md, "Neighbour quality"). A Wake word is paired with a base
# word when all of these hold:
#   1. the Wake word is a new token of lowercase ASCII letters only, at least
#      RULE_MIN_WAKE_LENGTH letters long (shorter coinages sit within one edit of too many
#      unrelated words), and not itself a whole-word base token (the study's add_tokens
#      also injects words such as "travail" that the base vocabulary has as "▁travail":
#      those are no respelling);
#   2. the base word is a whole-word base token (marker + lowercase ASCII letters);
#   3. both start with the same letter (a changed first letter mostly makes another word:
#      "drames" -> "frames");
#   4. their Levenshtein distance (unit-cost insertion, deletion, substitution) is at most
#      1, or at most 2 when the Wake word has RULE_LONG_WAKE_LENGTH letters or more (so the
#      base word has at least 6 letters, or 8 at distance 2: no length rule of its own);
#   5. the base word is the unique nearest: no other candidate of rules 2-3 is at the same
#      or a smaller distance.
RULE_MIN_WAKE_LENGTH = 7
RULE_LONG_WAKE_LENGTH = 10
_RULE_WORD = re.compile(r"[a-z]+")


class PairsFileError(UserError, ValueError):
    """A pairs file that cannot be read as 'WAKE ENGLISH' lines."""


class SourcePair(NamedTuple):
    wake: str
    english: str


def read_pairs(path) -> list[SourcePair]:
    """The pairs of a pairs file: one 'WAKE ENGLISH' pair per line, whitespace-separated.

    '#' starts a comment and blank lines are ignored. Errors name the file and line: a line
    that is not exactly two words, or a pair listed twice.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise PairsFileError(f"--pairs={path}: no such file; give a text file of 'WAKE ENGLISH' lines")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PairsFileError(f"--pairs={path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    pairs: list[SourcePair] = []
    first_line: dict[SourcePair, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise PairsFileError(f"{path} line {number}: expected two words 'WAKE ENGLISH', got {len(fields)}: "
                                 f"{line.strip()!r}")
        pair = SourcePair(*fields)
        if pair in first_line:
            raise PairsFileError(f"{path} line {number}: the pair {pair.wake} {pair.english} is already on line "
                                 f"{first_line[pair]}; list each pair once")
        first_line[pair] = number
        pairs.append(pair)
    if not pairs:
        raise PairsFileError(f"{path}: no pairs found; write one 'WAKE ENGLISH' pair per line")
    return pairs


def builtin_pairs() -> list[SourcePair]:
    """The built-in list of transparent Wake coinages and their English sources."""
    return read_pairs(BUILTIN_PAIRS_FILE)


def word_start_marker(base_tokens: Iterable[str | None]) -> str | None:
    """The word-start marker that begins the most base tokens, or None if neither does."""
    counts = collections.Counter(token[0] for token in base_tokens if token and token[0] in WORD_START_MARKERS)
    return counts.most_common(1)[0][0] if counts else None


def whole_word_ids(base_tokens: Sequence[str | None], marker: str | None) -> dict[str, int]:
    """word -> id of each base token that is `marker` + the word (a whole word with no space)."""
    if marker is None:
        return {}
    return {token[len(marker):]: i for i, token in enumerate(base_tokens)
            if token and token.startswith(marker) and len(token) > len(marker) and marker not in token[len(marker):]}


def new_token_ids(new_tokens: Sequence[str | None], n_base: int) -> dict[str, int]:
    """word -> id of each new (injected) token; new_tokens[i] is the token of id n_base + i.

    A leading word-start marker is not part of the word: `convert_ids_to_tokens` shows an
    added token in its normalised form under Llama's normalizer ("▁riverrun"), and no
    lexicon word starts with a marker.
    """
    words = {}
    for i, token in enumerate(new_tokens):
        if token and token[0] in WORD_START_MARKERS:
            token = token[1:]
        if token:
            words[token] = n_base + i
    return words


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit-cost insertion, deletion and substitution (Wagner-Fischer)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _deletions(word: str, depth: int) -> set[str]:
    """The word with up to `depth` letters deleted (itself included)."""
    found, frontier = {word}, {word}
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1:] for w in frontier for i in range(len(w))}
        found |= frontier
    return found


def rule_max_distance(wake_word: str) -> int:
    """Rule 4: the largest Levenshtein distance allowed for a Wake word of this length."""
    return 2 if len(wake_word) >= RULE_LONG_WAKE_LENGTH else 1


def edit_distance_pairs(wake_words: Iterable[str], base_words: Iterable[str]) -> list[tuple[SourcePair, int]]:
    """(pair, distance) for every Wake word the rule above pairs with a base word.

    Candidates are found by shared deletions (if two words are within distance k, deleting
    at most k letters from each makes them equal), then the exact distance decides, so the
    result is the same as comparing every Wake word with every base word, at a small
    fraction of the cost.
    """
    candidates = sorted({w for w in base_words if _RULE_WORD.fullmatch(w)})
    by_deletion: dict[str, list[str]] = collections.defaultdict(list)
    for word in candidates:
        for variant in _deletions(word, 2):
            by_deletion[variant].append(word)
    found = []
    known = set(candidates)
    for wake in sorted(set(wake_words)):
        if len(wake) < RULE_MIN_WAKE_LENGTH or not _RULE_WORD.fullmatch(wake) or wake in known:
            continue
        limit = rule_max_distance(wake)
        near = {word for variant in _deletions(wake, limit) for word in by_deletion.get(variant, ())
                if word[0] == wake[0]}
        distances = collections.defaultdict(list)
        for word in near:
            distance = levenshtein(wake, word)
            if distance <= limit:
                distances[distance].append(word)
        if distances:
            best = min(distances)
            if len(distances[best]) == 1:
                found.append((SourcePair(wake, distances[best][0]), best))
    return found


class ResolvedPairs(NamedTuple):
    """Pairs mapped to rows; skipped pairs by reason."""

    pairs: list[SourcePair]
    wake_ids: list[int]
    english_ids: list[int]
    skipped: dict[str, list[SourcePair]]


def resolve_pairs(pairs: Iterable[SourcePair], wake_ids: dict[str, int], english_ids: dict[str, int]) -> ResolvedPairs:
    """Each pair's (Wake row, English row), or the reason it is skipped (see the module docstring)."""
    resolved = ResolvedPairs([], [], [], {"wake_not_a_new_token": [], "english_not_a_single_base_token": []})
    for pair in pairs:
        if pair.wake not in wake_ids:
            resolved.skipped["wake_not_a_new_token"].append(pair)
        elif pair.english not in english_ids:
            resolved.skipped["english_not_a_single_base_token"].append(pair)
        else:
            resolved.pairs.append(pair)
            resolved.wake_ids.append(wake_ids[pair.wake])
            resolved.english_ids.append(english_ids[pair.english])
    return resolved


def vocabulary_maps(token_of: Callable[[int], str | None], n_base: int, n_rows: int
                    ) -> tuple[dict[str, int], dict[str, int], str | None]:
    """(new word -> id, whole base word -> id, the word-start marker) from the id -> token map."""
    base_tokens = [token_of(i) for i in range(n_base)]
    marker = word_start_marker(base_tokens)
    new_tokens = [token_of(i) for i in range(n_base, n_rows)]
    return new_token_ids(new_tokens, n_base), whole_word_ids(base_tokens, marker), marker
