"""Vocabulary injection: the Wake lexicon becomes new tokens and new embedding rows.

Phase 1 adds each coinage of the lexicon to the base tokenizer with transformers'
`add_tokens` (as the reference run did), grows the embedding table by one row per token
actually added, and initialises those rows from statistics of the base rows.

Why the tokenizer is loaded from tokenizer.json and nothing else: transformers 5 rebuilds
`LlamaTokenizer` from vocab and merges with a Metaspace pre-tokenizer and no normalizer.
Under that pipeline an added word matches the raw substring instead of "▁word", and the
Wake tokenizes into ~16% more tokens (418,494 instead of 360,623 according to
../shared/data/PROVENANCE.md), so neither the ids nor
the block counts of the reference run come out. Loading the shipped tokenizer.json as a
fast tokenizer keeps its normalizer (Prepend "▁" + Replace " " -> "▁") and reproduces the
reference's 44,500 new ids exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import unicodedata
from typing import Sequence

import numpy as np
from absl import logging
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from wake2vec.models import gguf_model
from wake2vec.tokens import whole_word
from wake2vec.training.data import read_utf8, tokenizers_backend
from wake2vec.errors import UserError


class LexiconError(UserError, ValueError):
    """The lexicon file cannot be used (missing, not UTF-8, malformed, empty)."""


class VocabError(UserError, ValueError):
    """The tokenizer cannot be loaded or augmented, or does not fit the model."""


def load_lexicon(path: str | os.PathLike) -> list[str]:
    """Reads one word per line: stripped, NFC, blank lines skipped, first duplicate kept.

    NFC because the same accented coinage can be typed composed or decomposed; both must
    become one token, and the corpus is NFC-normalised the same way (wake2vec.training.data).
    A line with inner whitespace is refused (file and line named): it is not a word, and
    `add_tokens` would silently turn it into a multi-word token.
    """
    text = read_utf8(path, error=LexiconError, what="lexicon")
    words: dict[str, None] = {}
    punctuation = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        word = unicodedata.normalize("NFC", line.strip())
        if not word:
            continue
        if any(ch.isspace() for ch in word):
            raise LexiconError(f"{path}:{line_no}: {word!r} contains whitespace; the lexicon is one word per line")
        if not any(ch.isalnum() for ch in word):
            punctuation.append(word)  # "...", "!!!", "—": no word to teach, and a token would swallow the text's punctuation
            continue
        words.setdefault(word, None)
    if punctuation:
        logging.warning("lexicon %s: %d entries without a letter or digit left out (%s)", path, len(punctuation),
                        ", ".join(repr(w) for w in punctuation[:5]) + (", ..." if len(punctuation) > 5 else ""))
    if not words:
        raise LexiconError(f"lexicon {path} has no words; pass --lexicon=PATH to a file with one word per line")
    return list(words)


# tokenizer_config.json / special_tokens_map.json keys passed to the fast tokenizer. Only
# the special-token names and wrapper behaviour: keys such as tokenizer_class, legacy or
# add_bos_token would let transformers rebuild or rewrite the shipped pipeline.
_CONFIG_KEYS = (
    "bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
    "additional_special_tokens", "model_max_length", "padding_side", "truncation_side",
    "clean_up_tokenization_spaces",
)


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabError(f"{path} is not valid JSON ({e}); restore it from the model's files") from None


def _token_content(value):
    """special_tokens_map.json stores tokens as {"content": ...} dicts or plain strings."""
    if isinstance(value, dict):
        return value["content"]
    if isinstance(value, list):
        return [_token_content(v) for v in value]
    return value


def load_base_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Loads tokenizer.json exactly as shipped, as a transformers fast tokenizer.

    `path` is a directory holding tokenizer.json, or the tokenizer.json file itself. The
    special tokens and max length come from tokenizer_config.json and special_tokens_map.json
    beside it when present (the map wins, as in transformers); everything that decides how
    text is split comes from tokenizer.json alone (see the module docstring). A .gguf file's
    tokenizer is rebuilt from its metadata (wake2vec.models.gguf_model).
    """
    if gguf_model.is_gguf(path):
        return gguf_model.load_tokenizer(path)
    p = pathlib.Path(path)
    if p.is_dir():
        file, folder = p / "tokenizer.json", p
    elif p.is_file():
        file, folder = p, p.parent
    else:
        raise VocabError(f"tokenizer path {p} does not exist; pass --tokenizer=DIR holding tokenizer.json")
    if not file.is_file():
        hint = ""
        if (folder / "tokenizer.model").is_file():
            hint = (
                " It has only a SentencePiece tokenizer.model: convert it once to tokenizer.json, e.g. with "
                "transformers<5 and sentencepiece installed: `python -c \"from transformers import "
                f"LlamaTokenizerFast as T; T.from_pretrained('{folder}').save_pretrained('{folder}')\"` "
                "(transformers 5's LlamaTokenizer rebuild tokenizes differently from the shipped Llama "
                "tokenizer.json, see wake2vec/tokens/vocab.py)."
            )
        raise VocabError(f"no tokenizer.json in {folder}.{hint}")
    kwargs = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            config = _read_json(folder / name)
            kwargs.update({k: _token_content(v) for k, v in config.items() if k in _CONFIG_KEYS and v is not None})
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(file), **kwargs)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise VocabError(f"cannot load {file} as a tokenizers file: {e}") from e


@dataclasses.dataclass(frozen=True)
class VocabStats:
    """What augmentation did; recorded as config.json's "vocab" entry."""

    base_size: int
    lexicon_words: int
    already_in_base: int
    added: int
    total: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def augment_tokenizer(tokenizer: PreTrainedTokenizerFast, words: Sequence[str]) -> VocabStats:
    """Adds the words with transformers' own `add_tokens` (mutating `tokenizer`).

    `add_tokens` registers every word, but a word that is already a vocabulary entry keeps
    its id and gets no new row (490 of the Wake lexicon's 44,990 are base pieces), so
    `added` is measured as the growth of len(tokenizer), never taken from add_tokens'
    return value (which counts all 44,990 in transformers 5). New ids are
    base_size .. total-1, in lexicon order.
    """
    words = list(dict.fromkeys(words))
    base_size = len(tokenizer)
    vocab = tokenizer.get_vocab()
    already = sum(w in vocab for w in words)
    tokenizer.add_tokens(words)
    total = len(tokenizer)
    if total == base_size:
        raise VocabError(
            f"the lexicon ({len(words)} words) adds no token: every word is already in the tokenizer's "
            f"vocabulary of {base_size}; check that --lexicon is the Wake lexicon and --tokenizer the base one"
        )
    stats = VocabStats(
        base_size=base_size, lexicon_words=len(words), already_in_base=already, added=total - base_size, total=total
    )
    logging.info(
        "lexicon: %d words, %d already in the base vocabulary, %d added: %d -> %d tokens",
        stats.lexicon_words, stats.already_in_base, stats.added, stats.base_size, stats.total,
    )
    return stats


INJECTION_MODES = ("reference", "whole_word")


def _rewrap(tokenizer: PreTrainedTokenizerFast, backend) -> PreTrainedTokenizerFast:
    """A new fast tokenizer around `backend` with `tokenizer`'s special tokens and settings."""
    kwargs = {k: v for k, v in tokenizer.init_kwargs.items() if k in _CONFIG_KEYS and v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def inject(
    base_tokenizer: PreTrainedTokenizerFast, words: Sequence[str], mode: str, text: str
) -> tuple[PreTrainedTokenizerFast, VocabStats, list[whole_word.Form]]:
    """(augmented tokenizer, stats, one Form per new id) for --injection=`mode`; the base is left as is.

    reference: `augment_tokenizer` (the study's add_tokens) on a copy; every new row is the
    word's marked form. whole_word: see wake2vec.tokens.whole_word; `text` (the corpus) decides
    which unmarked forms get a token.
    """
    backend = Tokenizer.from_str(tokenizers_backend(base_tokenizer).to_str())
    if mode == "reference":
        tokenizer = _rewrap(base_tokenizer, backend)
        stats = augment_tokenizer(tokenizer, words)
        return tokenizer, stats, [whole_word.Form(w, True) for w in added_words(tokenizer, stats.base_size)]
    if mode != "whole_word":
        raise ValueError(f"--injection={mode!r}; choose one of {', '.join(INJECTION_MODES)}")
    built, forms, already = whole_word.build(base_tokenizer, words, text)
    tokenizer = _rewrap(base_tokenizer, built)
    base_size = len(base_tokenizer)
    if not forms:
        raise VocabError(
            f"the lexicon ({len(words)} words) adds no token: every word is already one token of the base "
            "vocabulary; check that --lexicon is the Wake lexicon and --tokenizer the base one"
        )
    stats = VocabStats(base_size=base_size, lexicon_words=len(dict.fromkeys(words)), already_in_base=already,
                       added=len(forms), total=len(tokenizer))
    logging.info(
        "whole-word injection: %d words, %d already one base token, %d new tokens (%d unmarked forms): %d -> %d",
        stats.lexicon_words, stats.already_in_base, stats.added, sum(not f.marked for f in forms),
        stats.base_size, stats.total,
    )
    return tokenizer, stats, forms


def added_words(tokenizer: PreTrainedTokenizerFast, base_size: int) -> list[str]:
    """The words of ids base_size .. len(tokenizer)-1, i.e. one per new embedding row.

    Read from the added-tokens table (reference injection): `convert_ids_to_tokens` would
    return the normalised form ("▁riverrun") rather than the lexicon word ("riverrun"). A
    whole-word token is a model entry ("▁riverrun", "Ġriverrun" or "riverrun"): its word is
    its decoded text without the word-start space, so both forms of a word give the word.
    """
    backend = tokenizers_backend(tokenizer)
    decoder = backend.get_added_tokens_decoder()
    return [decoder[i].content if i in decoder else backend.decode([i]).lstrip(" ") for i in range(base_size, len(tokenizer))]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, workdir: str | os.PathLike) -> pathlib.Path:
    """Writes the augmented tokenizer to workdir/tokenizer/ and returns that directory.

    transformers 5 records tokenizer_class "TokenizersBackend", which transformers 4 does not
    know; it is rewritten to "PreTrainedTokenizerFast" so that AutoTokenizer of either
    version (and load_base_tokenizer) reads the saved tokenizer.json as is.
    """
    out = pathlib.Path(workdir) / "tokenizer"
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = _read_json(config_path)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def check_tokenizer_matches_model(
    tokenizer_size: int, embedding_rows: int, *, tokenizer_source: str, model_source: str
) -> None:
    """Refuses a base tokenizer with more tokens than the model has embedding rows.

    New tokens get ids from len(tokenizer) on and their rows are appended after the
    tokenizer's (a padded matrix, as Qwen2.5's, is cut to the tokenizer first:
    convert.drop_padding_rows); a tokenizer larger than the matrix belongs to another
    model, and its ids would index rows that do not exist.
    """
    if tokenizer_size > embedding_rows:
        raise VocabError(
            f"the tokenizer from {tokenizer_source} has {tokenizer_size} tokens but the model from "
            f"{model_source} has only {embedding_rows} embedding rows. Use the tokenizer "
            "that ships with this model (leave --tokenizer empty to take the one beside it)"
        )


# Word-start markers: SentencePiece's "▁" and byte-level BPE's "Ġ" (a space, byte-mapped).
_MARKERS = (whole_word.SP_MARKER, "Ġ")

# (context, separator) a piece list is cut out of: a marked form as after a word and a space,
# an unmarked one as at a line start. The separator is not part of the context, since
# byte-level BPE would spell a trailing space as a token of its own.
_CONTEXT = {True: ("a", " "), False: ("\n", "")}


def pieces_in_running_text(tokenizer, words: Sequence[str | whole_word.Form]) -> list[tuple[list[int], list[str]]]:
    """(ids, tokens) that `tokenizer` gives each word in running text, every piece kept.

    A plain string is a marked form (a word after a space). The pieces are those of the word
    inside "a " + word (or "\n" + word, unmarked) minus those of "a" (or "\n"), so a
    byte-level tokenizer spells the word with its word-start marker ("Ġriver", "run") as it
    does mid-text, not as it spells the bare string ("river", "run"); for Llama's layout this
    is the same as encoding the word alone. Works for the base tokenizer and for an injected
    one (a whole-word-injected lexicon word is then its one new id).
    """
    backend = tokenizers_backend(tokenizer)
    forms = [w if isinstance(w, whole_word.Form) else whole_word.Form(w, True) for w in words]
    contexts = {marked: backend.encode(c, add_special_tokens=False).ids for marked, (c, _) in _CONTEXT.items()}
    encodings = backend.encode_batch(["".join(_CONTEXT[f.marked]) + f.word for f in forms], add_special_tokens=False)
    pieces = []
    for form, enc in zip(forms, encodings):
        context = contexts[form.marked]
        if enc.ids[: len(context)] != context:
            raise AssertionError(f"the tokenizer merges {form.word!r} into its context {_CONTEXT[form.marked][0]!r}")
        pieces.append((enc.ids[len(context):], enc.tokens[len(context):]))
    return pieces


def subword_piece_ids(base_tokenizer, words: Sequence[str | whole_word.Form]) -> list[list[int]]:
    """Ids of the pieces the BASE tokenizer gives each new row's word in running text.

    The pieces of `pieces_in_running_text`, but when no merge joins the marker with the
    first letter (digits, punctuation, rare letters) the first piece is a bare marker: it is
    dropped whenever other pieces remain, since it carries no lexical content and keeping it
    would pull all such words toward one shared vector.
    """
    pieces = []
    for word, (ids, tokens) in zip(words, pieces_in_running_text(base_tokenizer, words)):
        if len(ids) > 1 and tokens[0] in _MARKERS:
            ids = ids[1:]
        if not ids:
            word = word.word if isinstance(word, whole_word.Form) else word
            raise VocabError(f"the base tokenizer splits {word!r} into no pieces")
        pieces.append(ids)
    return pieces


INIT_METHODS = ("mean_noise", "spherical", "subword_mean", "hewitt")

# Rows generated per chunk, so float64 work on 44,500 x 2048 stays ~130 MB at a time.
_CHUNK = 8192


def init_new_rows(
    base_table: np.ndarray,
    num_new: int,
    method: str,
    *,
    seed: int,
    noise_scale: float = 0.1,
    sphere_factor: float = 1.5,
    hewitt_eps: float = 1e-5,
    piece_ids: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """Initial rows (num_new, D) float32 for new tokens, from the base table (V_base, D).

    Statistics are computed in float64 over the base rows; all randomness comes from
    np.random.default_rng(seed), so a seed fixes the rows. The methods:

    * mean_noise (the reference): mu + noise_scale * sigma * N(0, I), with mu, sigma the
      per-dimension mean and standard deviation (ddof=0) of the base rows. New rows start
      near the centroid, spread a tenth of the base cloud's width.
    * spherical: a uniformly random direction at norm sphere_factor * s * sqrt(D), where s
      is the standard deviation of all base entries pooled (ddof=0): s * sqrt(D) is the
      RMS norm of a zero-mean row with that spread, the "base radius". Rows are centred at
      the origin, so every new row has exactly that norm.
    * subword_mean: the mean of the base rows of the word's pieces under the base tokenizer
      (`piece_ids`, one list per new row, from `subword_piece_ids`; the other methods
      ignore it).
    * hewitt (Hewitt 2021): mu + N(0, hewitt_eps * Sigma), Sigma the base covariance
      (ddof=1). Sampled through Sigma's eigendecomposition, which also copes with a singular
      Sigma (fewer base rows than dimensions).
    """
    base = np.asarray(base_table)
    if base.ndim != 2 or base.shape[0] < 2:
        raise ValueError(f"base_table must be (V_base >= 2, D), got shape {base.shape}")
    if num_new < 0:
        raise ValueError(f"num_new={num_new} must be non-negative")
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}; choose one of {', '.join(INIT_METHODS)}")
    v_base, dim = base.shape
    rng = np.random.default_rng(seed)
    out = np.empty((num_new, dim), dtype=np.float32)

    if method == "subword_mean":
        if piece_ids is None or len(piece_ids) != num_new:
            got = "none" if piece_ids is None else len(piece_ids)
            raise ValueError(f"subword_mean needs piece_ids for each of the {num_new} new rows, got {got}")
        for row, ids in enumerate(piece_ids):
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size == 0 or ids.min() < 0 or ids.max() >= v_base:
                raise ValueError(
                    f"piece ids {ids.tolist()} of new row {row} must be non-empty and in [0, {v_base}): "
                    "take them from the base tokenizer, before add_tokens"
                )
            out[row] = base[ids].mean(axis=0, dtype=np.float64)
        return out

    mean = base.mean(axis=0, dtype=np.float64)
    if method == "mean_noise":
        scale = noise_scale * base.std(axis=0, dtype=np.float64)

        def sample(m):
            return mean + scale * rng.standard_normal((m, dim))

    elif method == "spherical":
        radius = sphere_factor * float(base.std(dtype=np.float64)) * np.sqrt(dim)

        def sample(m):
            z = rng.standard_normal((m, dim))
            return radius * z / np.linalg.norm(z, axis=1, keepdims=True)

    else:  # hewitt
        eigval, eigvec = np.linalg.eigh(np.cov(base, rowvar=False, dtype=np.float64))
        # Rounding can leave tiny negative eigenvalues on a singular Sigma; they are zero.
        factor = eigvec * np.sqrt(hewitt_eps * np.clip(eigval, 0.0, None))  # factor @ factor.T = eps * Sigma

        def sample(m):
            return mean + rng.standard_normal((m, dim)) @ factor.T

    for start in range(0, num_new, _CHUNK):
        stop = min(start + _CHUNK, num_new)
        out[start:stop] = sample(stop - start)
    return out


def grow_table(base_table: np.ndarray, num_new: int, method: str, **init_kwargs) -> np.ndarray:
    """The base table with `num_new` initialised rows appended: (V_base + num_new, D) float32.

    Used for the input embedding, and for an untied LM head with the same method.
    `init_kwargs` are those of `init_new_rows` (seed is required).
    """
    new = init_new_rows(base_table, num_new, method, **init_kwargs)
    return np.concatenate([np.asarray(base_table, dtype=np.float32), new], axis=0)
