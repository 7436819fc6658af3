r"""Builds Phase 3's morpheme groups from a lexicon when no annotation exists (see wake2vec.phases.groups).

    python -m experiments.build_groups --lexicon=wake_lexicon.txt --tokenizer=TOKENIZER_DIR \
        --out=groups.jsonl [--min_pairs=3 --min_stem=3]

Pairs each lexicon word that is a whole word of the base vocabulary plus a suffix (-s, -ed,
-ing, -y) or a prefix (un-, re-) with that stem, one group per affix, and writes the groups
as JSONL in the study's format (docs/groups.md). The counts (pairs per group, lexicon words
matched and unmatched, and how many pairs touch a trainable Wake row once the lexicon is
injected, per injection mode) are printed and written beside --out as NAME.counts.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import ClassVar

from wake2vec import launcher
from wake2vec.config import FlagError
from wake2vec.errors import UserError


class NoGroupsError(UserError, ValueError):
    """No affix group reaches --min_pairs pairs."""


@dataclasses.dataclass(frozen=True)
class BuildGroupsConfig:
    """Flags of experiments.build_groups."""

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("lexicon", "tokenizer", "out")

    # The lexicon Phase 1 injected, one word per line.
    lexicon: str = ""
    # The base model's tokenizer: a directory holding tokenizer.json, or the file itself.
    tokenizer: str = ""
    # Where to write the morpheme groups (JSONL); the counts go beside it as NAME.counts.json.
    out: str = ""
    # Drop groups with fewer (word, stem) pairs than this, as the study did.
    min_pairs: int = 3
    # Only stems of at least this many letters: shorter whole-word tokens are mostly fragments.
    min_stem: int = 3


_REPORT_EXAMPLES = 5


def counts_path(out: str | pathlib.Path) -> pathlib.Path:
    """NAME.counts.json beside NAME.jsonl."""
    out = pathlib.Path(out)
    return out.with_name(out.stem + ".counts.json")


def build(cfg: BuildGroupsConfig) -> tuple[list, dict]:
    """(groups, counts) for the config; writes nothing."""
    import numpy as np

    from wake2vec.phases import groups
    from wake2vec.tokens import vocab

    base = vocab.load_base_tokenizer(cfg.tokenizer)
    words = vocab.load_lexicon(cfg.lexicon)
    found = groups.build_affix_groups(words, groups.base_whole_words(base), min_pairs=cfg.min_pairs,
                                      min_stem=cfg.min_stem)
    if not found:
        raise NoGroupsError(f"no affix group of {cfg.lexicon} reaches {cfg.min_pairs} pairs against the base "
                            "vocabulary of --tokenizer; lower --min_pairs or --min_stem, or check --tokenizer")
    counts = groups.affix_counts(words, found)
    counts["touching_trainable"] = {}
    for mode in vocab.INJECTION_MODES:
        # Mid-sentence words are marked forms, which need no corpus to be injected; only the
        # stats are used, so the norm band is left undefined.
        injected, stats, _ = vocab.inject(base, words, mode, "")
        _, data_stats = groups.alignment_data(injected, found, [], stats.base_size, band=(np.nan, np.nan))
        counts["touching_trainable"][mode] = {
            key: data_stats[key] for key in ("morph_pairs_touching_trainable", "morph_words_one_new_row")}
    return found, counts


def report(groups: list, counts: dict, out: pathlib.Path) -> str:
    lines = [f"{counts['groups']} groups, {counts['pairs']} pairs, written to {out}; counts in {counts_path(out)}",
             f"lexicon words matched: {counts['words_matched']}, unmatched: {counts['words_unmatched']}"]
    for group in sorted(groups, key=lambda g: -g.n_examples):
        shown = ", ".join(f"{w} = {b}" for w, b in zip(group.examples[:_REPORT_EXAMPLES], group.bases))
        lines.append(f"  {group.morpheme_type} {group.morpheme}: {group.n_examples} pairs ({shown}, ...)")
    for mode, touching in counts["touching_trainable"].items():
        lines.append(f"--injection={mode}: {touching['morph_pairs_touching_trainable']} of {counts['pairs']} pairs "
                     f"touch a trainable Wake row; {touching['morph_words_one_new_row']} words are one new row")
    return "\n".join(lines)


def run(cfg: BuildGroupsConfig) -> str:
    missing = [f"--{name}" for name in ("lexicon", "tokenizer", "out") if not getattr(cfg, name)]
    if missing:
        raise FlagError(f"{', '.join(missing)} required: the lexicon, the base tokenizer and where to write the groups")
    for name in ("min_pairs", "min_stem"):
        if getattr(cfg, name) < 1:
            raise FlagError(f"--{name}={getattr(cfg, name)} must be at least 1")
    from wake2vec.phases import groups as group_files
    from wake2vec.training.workdir import atomic_write_text

    found, counts = build(cfg)
    out = pathlib.Path(cfg.out)
    group_files.write_groups(out, found)
    atomic_write_text(counts_path(out), json.dumps(counts, indent=2, ensure_ascii=False) + "\n")
    return report(found, counts, out)


if __name__ == "__main__":
    launcher.launch(BuildGroupsConfig, run, __doc__)
