"""A small Llama-like BPE tokenizer, trained at run time on the demo's own text.

The embedded demo cannot ship Meta's Llama 2 tokenizer (its licence is not ours), yet the
rest of the pipeline should meet the same kind of tokenizer it meets on TinyLlama. So the
demo trains one on the bundled sample with the `tokenizers` library and gives it the
layout of Llama 2's `tokenizer.json`:

* normalizer `Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer: "▁" marks a word
  start, and the whole string reaches the BPE model as it is;
* BPE with `byte_fallback`, the 256 byte tokens `<0x00>`..`<0xFF>` at ids 3..258, so any
  character absent from training still encodes (as its UTF-8 bytes) and decodes back;
* `<unk>`=0, `<s>`=1, `</s>`=2; a post-processor that puts `<s>` in front, as Llama does;
* decoder Replace("▁", " "), ByteFallback, Fuse, Strip(one leading space).

Training needs one thing the final layout lacks: a pre-tokenizer. Without one the trainer
would learn merges across words ("e▁the") and across punctuation ("world,"), which
SentencePiece never does. Training therefore splits before each "▁", isolates punctuation
and splits digits one by one (as Llama 2 does). The finished tokenizer drops that
pre-tokenizer, and this changes no segmentation: every learned merge lies inside one
training piece, so no merge can span a "▁", a punctuation mark or a digit in the raw string.

The vocabulary is kept small (1,024 by default) on purpose: coined words must split into
several pieces, because the demo then adds them as new whole-word tokens.
"""

from __future__ import annotations

import json

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
import transformers

WORD_START = "▁"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


def train_demo_tokenizer(text: str, vocab_size: int = 1024) -> transformers.PreTrainedTokenizerFast:
    """Trains a Llama-layout BPE tokenizer on `text`; the same text gives the same tokenizer.

    `vocab_size` counts everything: the 3 special tokens, the 256 byte tokens, every
    character of the text and the learned merges. Each line of `text` is one training
    sequence, so newlines are never pieces and encode as `<0x0A>`, as in Llama 2.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("cannot train a tokenizer on empty text; pass the corpus the demo trains on")
    alphabet_size = len({ch for line in lines for ch in line.replace(" ", WORD_START)} | {WORD_START})
    floor = len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + alphabet_size
    if vocab_size <= floor:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for merges: the special and byte tokens and the "
            f"text's {alphabet_size} distinct characters already take {floor}; use at least {floor + 1}"
        )

    trained = _train_bpe(lines, vocab_size - len(BYTE_TOKENS))
    tokenizer = _llama_layout(trained)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        # Decoding must give the text back; transformers' space clean-up would rewrite " ," etc.
        clean_up_tokenization_spaces=False,
    )


def _llama_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.Prepend(WORD_START), normalizers.Replace(" ", WORD_START)])


def _training_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Bounds what merges may be learned from: a word start, a punctuation mark, a digit."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(WORD_START, behavior="merged_with_next"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def _train_bpe(lines: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Learns BPE merges within words (see the module docstring for the split rules)."""
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = _llama_normalizer()
    tokenizer.pre_tokenizer = _training_pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def _llama_layout(trained: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Rebuilds the trained model with Llama 2's ids and pipeline.

    The byte tokens are inserted after the specials here rather than given to the trainer,
    because the trainer would register them as special added tokens: typed text such as
    "<0x41>" would then match them, and skip_special_tokens would drop real bytes.
    """
    model = json.loads(trained.to_str())["model"]
    learned = sorted((i, piece) for piece, i in model["vocab"].items() if piece not in SPECIAL_TOKENS)
    vocab = {piece: i for i, piece in enumerate(SPECIAL_TOKENS + BYTE_TOKENS + tuple(p for _, p in learned))}
    merges = [tuple(pair) for pair in model["merges"]]

    tokenizer = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = _llama_normalizer()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(WORD_START, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer.add_special_tokens(
        [tokenizers.AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS]
    )
    return tokenizer
