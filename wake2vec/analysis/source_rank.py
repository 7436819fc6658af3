"""summary.json's source_rank section: where each coinage's English source ranks.

For each (Wake word, English source) pair (source_pairs.py says which pairs and which
rows), the rank of the English row among the base rows by cosine to the Wake row
(metrics.source_ranks), in the trained table and in the pre-training snapshot. Groups are
reported apart because they answer different questions: `builtin` (chosen by hand for
meaning), `edit_distance` (found by a rule, at scale) and `user` (a --pairs file).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from wake2vec.analysis import metrics, source_pairs

# Edit-distance pairs ranked; a seeded sample when the rule finds more (1,268 for TinyLlama).
# 500 keep a top-k share's standard error under 2.3 points and cost about 3 CPU-seconds of
# float64 BLAS per table against 32,000 base rows of 2,048 dims (BUILD.md).
MAX_RULE_PAIRS = 500
TOP = (5, 50)


def _groups(token_of: Callable[[int], str | None], n_base: int, n_rows: int, user_pairs, rng: np.random.Generator
            ) -> tuple[dict[str, source_pairs.ResolvedPairs], dict[str, int], dict]:
    """(group -> resolved pairs, rule distance of each ranked rule pair's Wake word, meta)."""
    wake_ids, english_ids, marker = source_pairs.vocabulary_maps(token_of, n_base, n_rows)
    found = source_pairs.edit_distance_pairs(wake_ids, english_ids)
    chosen = np.arange(len(found))
    if len(found) > MAX_RULE_PAIRS:
        chosen = np.sort(rng.choice(len(found), MAX_RULE_PAIRS, replace=False))
    listed = {"builtin": source_pairs.builtin_pairs(), "edit_distance": [found[i][0] for i in chosen]}
    if user_pairs is not None:
        listed["user"] = user_pairs
    groups = {name: source_pairs.resolve_pairs(pairs, wake_ids, english_ids) for name, pairs in listed.items()}
    distances = {found[i][0].wake: found[i][1] for i in chosen}
    meta = {
        "marker": marker,
        "edit_distance_found": len(found),
        "edit_distance_used": int(chosen.size),
        "edit_distance_sampling": "all pairs found" if len(found) <= MAX_RULE_PAIRS
        else f"seeded sample of {MAX_RULE_PAIRS} of the {len(found)} pairs found",
        "edit_distance_rule": (
            f"Wake word: a new token of lowercase ASCII letters, >= {source_pairs.RULE_MIN_WAKE_LENGTH} long, not "
            "itself a whole-word base token; English word: a whole-word base token of lowercase ASCII letters with "
            f"the same first letter, at Levenshtein distance <= 1 (<= 2 from {source_pairs.RULE_LONG_WAKE_LENGTH} "
            "Wake letters), the unique nearest such word"),
        "mapping": "Wake word: its new token's row; English word: its single whole-word base token (word-start "
        "marker + word); pairs without one are skipped and counted, never approximated by the mean of pieces",
        "rank": "1 + base rows of higher cosine to the Wake row + base rows of equal cosine and lower id (1 = nearest)",
    }
    return groups, distances, meta


def section(E_post: np.ndarray, E_pre: np.ndarray | None, n_base: int, token_of: Callable[[int], str | None], *,
            user_pairs: list[source_pairs.SourcePair] | None, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """(section, meta, ranks for the figure): per group, the pairs used and skipped, the
    rank summary after (post) and before (pre; None without E_pre) training, and every
    pair's ranks and cosines. `rng` draws the rule pairs' sample when there are too many."""
    groups, distances, meta = _groups(token_of, n_base, E_post.shape[0], user_pairs, rng)
    tables = {"post": E_post, "pre": E_pre}
    result, figure_ranks = {}, {}
    for name, group in groups.items():
        ranks = {when: None if table is None else
                 metrics.source_ranks(table[group.wake_ids], table[:n_base], group.english_ids)
                 for when, table in tables.items()}
        figure_ranks[name] = {when: None if value is None else value[0] for when, value in ranks.items()}
        rows = []
        for i, pair in enumerate(group.pairs):
            row = {"wake": pair.wake, "english": pair.english, "wake_id": group.wake_ids[i],
                   "english_id": group.english_ids[i]}
            if name == "edit_distance":
                row["distance"] = distances[pair.wake]
            for when, value in ranks.items():
                row[f"rank_{when}"] = None if value is None else int(value[0][i])
                row[f"cosine_{when}"] = None if value is None else float(value[1][i])
            rows.append(row)
        result[name] = {
            "listed": len(group.pairs) + sum(len(skipped) for skipped in group.skipped.values()),
            "used": len(group.pairs),
            **{when: None if value is None else metrics.rank_summary(*value, top=TOP) for when, value in ranks.items()},
            "skipped": {reason: {"n": len(skipped), "pairs": [f"{pair.wake} {pair.english}" for pair in skipped]}
                        for reason, skipped in group.skipped.items()},
            "pairs": rows,
        }
    return result, meta, figure_ranks


def headline(summary: Mapping) -> str:
    """One line per pair group: pairs used, median rank and top-5 / top-50 shares, before -> after."""
    ranks = summary.get("source_rank")
    if ranks is None:
        return f"source rank: {summary['meta']['sampling']['source_rank']}"

    def figures(stats):
        if stats is None:
            return "n/a"
        return f"median {stats['median_rank']:g}, top-5 {stats['share_top5']:.1%}, top-50 {stats['share_top50']:.1%}"

    lines = [f"source rank among {summary['meta']['n_base']:,} base rows (1 = nearest), before -> after training:"]
    lines += [f"  {name}: {group['used']} of {group['listed']} pairs: {figures(group['pre'])} -> {figures(group['post'])}"
              for name, group in ranks.items()]
    return "\n".join(lines)
