"""--init=distill: new rows from the frozen model's own hidden states (Token Distillation).

The idea is that of Dobler, Elliott & de Melo (ICLR 2026, arXiv 2505.20133): a new token
should leave the frozen model in the state its old spelling left it in. For each new row we
take up to `contexts` places where its word occurs in the TRAINING text (a fixed generic
sentence when it never does), tokenize the window with the base tokenizer, and run the frozen
model twice:

  teacher  prefix + spelling (the base pieces of the word) + suffix
  student  prefix + NEW + suffix

and move only the new row so that the student's residual stream at `layer`, at the new
token and at every suffix token, matches the teacher's at the spelling's last piece and the
same suffix tokens (mean squared error over hidden dimensions, masked for padding).

Fixed shapes, so one compile serves every batch: W words x C contexts per step; prefixes are
left-padded to P tokens, spellings to K, suffixes right-padded to S. Left padding is masked
out of attention and positions count only real tokens, so a padded sequence computes exactly
what its unpadded one would. Rows are independent (Adam is per coordinate and each row's loss
touches only its own contexts), so batching changes no result; padded dummy words carry zero
weight.

The output side. With a tied table the distilled row is also the new token's output vector,
and nothing in the hidden-state objective asks it to be a good one. `output`:
  input        the head row is the distilled row (tied: the table is one matrix);
  subword_mean untied only: the head row is the mean of the spelling's head rows;
  first_piece  untied only: the head row is the head row of the spelling's first piece, the
               token the base model would emit to start the word;
  joint        adds `joint_weight` x the next-token loss of predicting the new token at the
               last prefix position, over the base vocabulary plus the step's W new rows (the
               rest of the new rows are left out: a sampled softmax), using the row as both
               input and output. Needs the full model (layer is then any layer).
docs/distill.md gives the measurement behind the default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import re
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wake2vec.models import model
from wake2vec.training import hosts, workdir as records
from wake2vec.tokens import whole_word
from wake2vec.config import ModelConfig

OUTPUT_CHOICES = ("input", "subword_mean", "first_piece", "joint")

# The context of a word that never occurs in the training text: a neutral frame, the word
# after a space (marked form) or at a line start (unmarked form).
GENERIC_PREFIX = "Here is a word that appears in the book:"
GENERIC_SUFFIX = "."


@dataclasses.dataclass(frozen=True)
class Settings:
    layer: int = -1  # index into the decoder layers' outputs; negative counts from the last
    contexts: int = 4  # C
    prefix_tokens: int = 16  # P
    suffix_tokens: int = 8  # S
    max_spelling: int = 16  # K; longer spellings are cut to their first K pieces
    words_per_step: int = 32  # W
    steps: int = 30
    lr: float = 1e-2  # Adam, in units of the base table's per-entry std (scale free across models)
    output: str = "input"
    joint_weight: float = 0.1


@dataclasses.dataclass
class Contexts:
    """Token windows, one set of C per new row; lengths say how much of each slot is real."""

    prefix: np.ndarray  # (N, C, P) int32, left-aligned to the right edge (real tokens last)
    prefix_len: np.ndarray  # (N, C)
    spell: np.ndarray  # (N, C, K), real pieces first
    spell_len: np.ndarray  # (N, C)
    suffix: np.ndarray  # (N, C, S), real tokens first
    suffix_len: np.ndarray  # (N, C)
    context_len: np.ndarray  # (N,) contexts in use (>= 1)
    from_training: np.ndarray  # (N,) bool: False where the generic context stands in

    def take(self, idx: np.ndarray) -> "Contexts":
        return Contexts(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


def _occurrences(text: str, form: whole_word.Form, limit: int) -> list[tuple[int, int]]:
    """(start, end) of up to `limit` whole-word occurrences of the form, in text order.

    A marked form follows a space; an unmarked one follows anything but a space or a
    word character. Neither may run on into a word character. (str.find, not a regex per
    word: 49,000 words over the whole book.)
    """
    found, at, word = [], 0, form.word
    while len(found) < limit:
        start = text.find(word, at)
        if start < 0:
            break
        end, at = start + len(word), start + 1
        prev = text[start - 1] if start else "\n"
        if (prev == " ") != form.marked or (not form.marked and _WORD.match(prev)):
            continue
        if end < len(text) and _WORD.match(text[end]):
            continue
        found.append((start, end))
    return found


_WORD = re.compile(r"\w")


def build_contexts(base_tokenizer, forms: Sequence[whole_word.Form], train_texts: Sequence[str],
                   settings: Settings, *, window_chars: int = 160) -> Contexts:
    """The C windows of each new row from the training texts (the training blocks, decoded).

    The window is tokenized whole and split at the word by character offsets, so prefix,
    spelling and suffix are the pieces the base tokenizer gives the running text. An
    occurrence whose word shares a token with its neighbours is skipped.
    """
    n, c = len(forms), settings.contexts
    p, k, s = settings.prefix_tokens, settings.max_spelling, settings.suffix_tokens
    out = Contexts(np.zeros((n, c, p), np.int32), np.zeros((n, c), np.int32), np.zeros((n, c, k), np.int32),
                   np.zeros((n, c), np.int32), np.zeros((n, c, s), np.int32), np.zeros((n, c), np.int32),
                   np.zeros(n, np.int32), np.zeros(n, bool))
    joined = "\n".join(train_texts)
    for row, form in enumerate(forms):
        windows = []
        for start, end in _occurrences(joined, form, 4 * c):
            lo, hi = max(0, start - window_chars), min(len(joined), end + window_chars // 2)
            windows.append((joined[lo:hi], start - lo, end - lo))
        generic = GENERIC_PREFIX + (" " if form.marked else "\n")
        windows.append((generic + form.word + GENERIC_SUFFIX, len(generic), len(generic) + len(form.word)))
        used = 0
        for text, start, end in windows:
            if used == c or (used and text.startswith(GENERIC_PREFIX)):
                break
            # A marked word's spelling starts at its space: tokenizers put the word-start marker
            # (SentencePiece's "▁", byte-level's "Ġ") on the word's first piece.
            start -= int(form.marked)
            enc = base_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            if any(a < start < b or a < end < b for a, b in offsets):
                continue  # the word is merged with a neighbour: no clean spelling here
            pre = [i for i, (a, b) in zip(ids, offsets) if b <= start]
            word = [i for i, (a, b) in zip(ids, offsets) if a < end and b > start]
            post = [i for i, (a, b) in zip(ids, offsets) if a >= end and b > end]
            if not word:
                continue
            pre, word, post = pre[-p:], word[:k], post[:s]
            out.prefix[row, used, p - len(pre):], out.prefix_len[row, used] = pre, len(pre)
            out.spell[row, used, :len(word)], out.spell_len[row, used] = word, len(word)
            out.suffix[row, used, :len(post)], out.suffix_len[row, used] = post, len(post)
            out.from_training[row] |= not text.startswith(GENERIC_PREFIX)
            used += 1
        if not used:
            raise AssertionError(f"no context for {form.word!r}, not even the generic one")
        out.context_len[row] = used
    return out


def _truncate(cfg: ModelConfig, frozen: dict, layer: int, keep_all: bool) -> tuple[ModelConfig, dict, int]:
    """The model cut after `layer` (nothing above it can change the objective) and the layer's index."""
    num = cfg.num_hidden_layers
    layer = layer % num
    if keep_all or layer == num - 1:
        return cfg, frozen, layer
    changes = {"num_hidden_layers": layer + 1}
    if cfg.layer_types:
        changes["layer_types"] = tuple(cfg.layer_types[: layer + 1])
    cut = {**frozen, "layers": jax.tree_util.tree_map(lambda a: a[: layer + 1], frozen["layers"])}
    return cfg.replace(**changes), cut, layer


def residual_streams(cfg, params, ids, valid):
    """Per-layer residual stream (L, B, T, D) of sequences whose padding `valid` marks False.

    Public with `layouts`: benchmarks/distill_smollm2.py scores held-out contexts through the
    same forward and layout the objective uses."""
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    length = ids.shape[1]
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    # A padded query attends to itself only, so it stays finite and touches nothing real.
    mask = (causal[None] & valid[:, None, :]) | jnp.eye(length, dtype=bool)[None]
    module = model.LlamaModel(cfg, table_rows=params["embedding"].shape[0])
    hidden, per_layer, _ = module.apply({"params": params}, ids, positions, mask)
    return hidden, per_layer


def layouts(batch: Contexts, settings: Settings, new_ids: np.ndarray):
    """Teacher and student (ids, valid) of shape (W*C, T) and the student's loss weights (W*C, 1+S)."""
    p, k, s = settings.prefix_tokens, settings.max_spelling, settings.suffix_tokens
    w, c = batch.prefix.shape[:2]
    pre_valid = np.arange(p)[None, None] >= p - batch.prefix_len[..., None]
    suf_valid = np.arange(s)[None, None] < batch.suffix_len[..., None]
    # The spelling is right-aligned next to the suffix, so its last piece sits at P+K-1 in every row.
    spell_r = np.zeros_like(batch.spell)
    spell_valid = np.arange(k)[None, None] >= k - batch.spell_len[..., None]
    for i, j in np.ndindex(w, c):
        n = batch.spell_len[i, j]
        if n:
            spell_r[i, j, k - n:] = batch.spell[i, j, :n]
    teacher = np.concatenate([batch.prefix, spell_r, batch.suffix], axis=2).reshape(w * c, -1)
    teacher_valid = np.concatenate([pre_valid, spell_valid, suf_valid], axis=2).reshape(w * c, -1)
    new = np.broadcast_to(new_ids[:, None, None], (w, c, 1))
    student = np.concatenate([batch.prefix, new, batch.suffix], axis=2).reshape(w * c, -1)
    in_use = np.arange(c)[None] < batch.context_len[:, None]  # (W, C)
    word_valid = (in_use & (batch.spell_len > 0))[..., None]
    student_valid = np.concatenate([pre_valid, word_valid, suf_valid], axis=2).reshape(w * c, -1)
    weight = np.concatenate([word_valid, suf_valid & word_valid], axis=2).astype(np.float32)
    return (teacher.astype(np.int32), teacher_valid), (student.astype(np.int32), student_valid), weight


def make_steps(cfg: ModelConfig, frozen: dict, base_table: np.ndarray, settings: Settings):
    """(teacher_fn, step_fn, loss_fn), jitted once for the settings' shapes.

    teacher_fn(ids, valid) -> targets (W*C, 1+S, D); step_fn(rows, opt, batch) -> rows, opt, loss;
    loss_fn(rows, batch) -> per-word MSE (W,). `batch` is (student_ids, student_valid, weight,
    targets, spell_first) with weights (W, C, 1+S).
    """
    joint = settings.output == "joint"
    cfg, frozen, layer = _truncate(cfg, frozen, settings.layer, keep_all=joint)
    base = jnp.asarray(base_table, jnp.float32)
    v_base = base.shape[0]
    p, k = settings.prefix_tokens, settings.max_spelling
    lr = settings.lr * float(np.std(base_table))

    @jax.jit
    def teacher_fn(ids, valid):
        _, per_layer = residual_streams(cfg, {**frozen, "embedding": base}, ids, valid)
        return per_layer[layer][:, p + k - 1:]

    def losses(rows, batch):
        ids, valid, weight, targets = batch
        w, c = weight.shape[:2]
        table = jnp.concatenate([base, rows], axis=0)
        hidden, per_layer = residual_streams(cfg, {**frozen, "embedding": table}, ids, valid)
        err = jnp.mean((per_layer[layer][:, p:] - targets) ** 2, axis=-1).reshape(w, c, -1)
        mse = jnp.sum(err * weight, axis=(1, 2)) / jnp.maximum(jnp.sum(weight, axis=(1, 2)), 1.0)
        if not joint:
            return mse, mse
        # The new token's next-token loss from the last prefix position, over base + this step's rows.
        last = hidden[:, p - 1].reshape(w, c, -1)
        logits = model.logits_from_hidden(cfg.replace(vocab_size=table.shape[0], tie_word_embeddings=True),
                                          {"embedding": table}, last)
        target = (v_base + jnp.arange(w))[:, None, None]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target, axis=-1)[..., 0]
        # Only contexts with a real token before the word can predict it.
        in_use = weight[:, :, 0] * valid[:, p - 1].reshape(w, c)
        ce = jnp.sum(nll * in_use, axis=1) / jnp.maximum(jnp.sum(in_use, axis=1), 1.0)
        return mse + settings.joint_weight * ce, mse

    @jax.jit
    def step_fn(rows, opt, batch):
        m, v, t = opt
        (_, mse), grad = jax.value_and_grad(lambda r: (lambda a, b: (jnp.sum(a), b))(*losses(r, batch)),
                                            has_aux=True)(rows)
        t = t + 1
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        update = (m / (1 - 0.9**t)) / (jnp.sqrt(v / (1 - 0.999**t)) + 1e-8)
        return rows - lr * update, (m, v, t), mse

    loss_fn = jax.jit(lambda rows, batch: losses(rows, batch)[1])
    return teacher_fn, step_fn, loss_fn


@dataclasses.dataclass
class Result:
    rows: np.ndarray  # (N, D) float32 distilled rows
    mse_before: np.ndarray  # (N,) at the starting rows
    mse_after: np.ndarray  # (N,)
    seconds: float  # this call's, so a resumed call counts only the rows it distilled
    resumed_rows: int = 0  # rows read back from the progress file instead of distilled again


def fingerprint(base_table: np.ndarray, contexts: Contexts, init_rows: np.ndarray, settings: Settings) -> str:
    """sha256 of everything the distilled rows are a function of (the frozen body is the run's, hash-checked)."""
    digest = hashlib.sha256(repr(settings).encode())
    for array in (base_table, init_rows, *(getattr(contexts, f.name) for f in dataclasses.fields(contexts))):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _read_progress(path: pathlib.Path | None, key: str, n: int):
    """(rows, before, after, done) saved by an earlier call on the same inputs, or None."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as saved:
            if str(saved["fingerprint"]) != key or saved["rows"].shape[0] != n:
                logging.warning("%s was written for other distill inputs; distilling from the start", path)
                return None
            return saved["rows"], saved["mse_before"], saved["mse_after"], int(saved["done"])
    except (OSError, ValueError, KeyError, EOFError) as error:  # a torn or foreign file: it is only a cache
        logging.warning("%s is unreadable (%s); distilling from the start", path, error)
        return None


def distill(cfg: ModelConfig, frozen: dict, base_table: np.ndarray, contexts: Contexts, init_rows: np.ndarray,
            settings: Settings, *, progress: Callable[[str], None] = logging.info,
            progress_file: pathlib.Path | None = None, save_every_s: float = 60.0) -> Result:
    """Distilled rows for every new row, starting from `init_rows` (N, D), W words at a time.

    With `progress_file`, the rows done so far are saved there at most every `save_every_s`
    seconds and at the end, and a call on the same inputs (`fingerprint`) starts where the
    file ends: an interrupted distillation resumes, and a finished one is read back whole.
    Rows are independent of the batch they are in, so a resumed result equals an
    uninterrupted one bit for bit.
    """
    if settings.output not in OUTPUT_CHOICES:
        raise ValueError(f"distill output {settings.output!r}; choose one of {', '.join(OUTPUT_CHOICES)}")
    n, w = len(init_rows), settings.words_per_step
    v_base = base_table.shape[0]
    key = fingerprint(base_table, contexts, init_rows, settings) if progress_file is not None else ""
    saved = _read_progress(progress_file, key, n)
    hosts.barrier("distill progress read")  # before the writer may replace the file
    if saved is not None:
        (rows_out, before, after), resumed = (np.array(a) for a in saved[:3]), saved[3]
        progress(f"distill: {resumed}/{n} rows read back from {progress_file}")
    else:
        rows_out, resumed = np.array(init_rows, np.float32), 0
        before, after = np.zeros(n, np.float32), np.zeros(n, np.float32)
    started = last_save = time.perf_counter()
    if resumed < n:
        teacher_fn, step_fn, loss_fn = make_steps(cfg, frozen, base_table, settings)
    for lo in range(resumed, n, w):
        idx = np.arange(lo, lo + w)
        real = idx < n
        batch = contexts.take(np.minimum(idx, n - 1))
        batch.context_len = np.where(real, batch.context_len, 0)  # dummy words weigh nothing
        (t_ids, t_valid), (s_ids, s_valid), weight = layouts(batch, settings, v_base + np.arange(w))
        targets = teacher_fn(t_ids, t_valid)
        args = (jnp.asarray(s_ids), jnp.asarray(s_valid), jnp.asarray(weight), targets)
        rows = jnp.asarray(rows_out[np.minimum(idx, n - 1)])
        opt = (jnp.zeros_like(rows), jnp.zeros_like(rows), jnp.zeros((), jnp.float32))
        first = np.asarray(loss_fn(rows, args))
        for _ in range(settings.steps):
            rows, opt, _ = step_fn(rows, opt, args)
        last = np.asarray(loss_fn(rows, args))
        done = min(lo + w, n)
        rows_out[lo:done], before[lo:done], after[lo:done] = np.asarray(rows)[real], first[real], last[real]
        now = time.perf_counter()
        if progress_file is not None and (done == n or now - last_save >= save_every_s):
            records.atomic_save_npz(progress_file, rows=rows_out, mse_before=before, mse_after=after,
                                    done=np.int64(done), fingerprint=np.str_(key))
            last_save = time.perf_counter()
        rate = (done - resumed) / (now - started)
        progress(f"distill: {done}/{n} rows, {rate:.3g} rows/s, ETA {(n - done) / rate:.0f} s, "
                 f"MSE {before[:done].mean():.4g} -> {after[:done].mean():.4g}")
    return Result(rows_out, before, after, time.perf_counter() - started, resumed)


def output_rows(output: str, head_base: np.ndarray, piece_ids: Sequence[Sequence[int]],
                distilled: np.ndarray) -> np.ndarray:
    """The new head rows (N, D) of an untied model for --distill_output (see the module docstring)."""
    if output in ("input", "joint"):
        return distilled
    if output == "subword_mean":
        return np.stack([head_base[np.asarray(ids)].mean(axis=0, dtype=np.float64) for ids in piece_ids]).astype(np.float32)
    if output == "first_piece":
        return np.asarray(head_base[[ids[0] for ids in piece_ids]], np.float32)
    raise ValueError(f"distill output {output!r}; choose one of {', '.join(OUTPUT_CHOICES)}")
