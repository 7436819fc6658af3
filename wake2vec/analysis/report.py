"""Composes the metrics into the summary of an embedding table, and writes it to disk.

`analyze` is the public entry point (DESIGN.md's surface): a trained table whose rows
[:base_vocab_size] are the base vocabulary and the rest the injected Wake tokens, plus
optionally the pre-training snapshot (for drift) and the id -> token map (for names).
It returns one dict of plain Python numbers, strings, lists and None, which
`json.dumps(..., allow_nan=False)` always accepts: a quantity that is undefined on the given
data (a t statistic of two constant samples, say) is None, never NaN.

Everything random (subsamples, pairs, neighbour queries) draws from a stream derived from
(seed, purpose), so a seed fixes the whole summary, and adding a new random step never
shifts the draws of an existing one. What was sampled, and to what size, is in `meta`.

`run_analysis` also writes summary.json, the six-panel PNG and the source-rank figure; the
launchers call it. Given Phase 3's groups (`groups=`, an alignment.AlignmentData), both add
the `morphology` section (analysis.morphology) and run_analysis its figure; without them
the summary is as before.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import zlib
from typing import Callable, Mapping, Sequence

import numpy as np
import scipy

import wake2vec
from wake2vec.analysis import metrics, morphology, seen_split, source_pairs, source_rank
from wake2vec.analysis.plots import FigureData, plot_embedding_analysis, plot_morphology, plot_source_ranks

# The study's partition ratio is O(n^2 D); it used a sample of 5,000 vectors.
PARTITION_RATIO_SAMPLE = 5_000
# Isotropy measures depend on n, so every group is measured on a sample of one common size:
# the smaller group's size, capped here (TinyLlama's 32,000 base rows fit under the cap).
ISOTROPY_MAX_N = 32_768
# Pairs per pairwise-cosine distribution; also bounded by n/2 of the smaller group.
MAX_PAIRS = 20_000
NEIGHBOR_QUERIES_PER_SEGMENT = 5
NEIGHBOR_K = 5
TOP_DRIFTED = 20
TOP_EIGENVALUES = 20

SUMMARY_FILENAME = "summary.json"
FIGURE_FILENAME = "embedding_analysis.png"
SOURCE_RANK_FIGURE_FILENAME = "source_ranks.png"
MORPHOLOGY_FIGURE_FILENAME = "morphology.png"

Tokens = Sequence[str] | Mapping[int, str] | None


def _stream(seed: int, purpose: str) -> np.random.Generator:
    """An independent generator per purpose: crc32 gives a stable id for the name."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def _token_lookup(tokens: Tokens) -> Callable[[int], str | None]:
    if tokens is None:
        return lambda _: None
    if isinstance(tokens, Mapping):
        return lambda i: tokens.get(int(i))
    if isinstance(tokens, np.ndarray):
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise TypeError(f"tokens must be a sequence or a mapping id -> str, got {type(tokens).__name__}")
    return lambda i: tokens[i] if i < len(tokens) else None


def _validate(E_post, base_vocab_size, E_pre, seed) -> tuple[np.ndarray, np.ndarray | None]:
    E_post = np.asarray(E_post)
    if E_post.ndim != 2 or not np.issubdtype(E_post.dtype, np.floating):
        raise ValueError(f"E_post must be a 2-D float array (rows x dims), got {E_post.dtype} {E_post.shape}")
    n_rows = E_post.shape[0]
    if isinstance(base_vocab_size, bool) or not isinstance(base_vocab_size, (int, np.integer)):
        raise TypeError(f"base_vocab_size must be an int, got {base_vocab_size!r}")
    if not 2 <= base_vocab_size <= n_rows - 2:
        raise ValueError(
            f"base_vocab_size={base_vocab_size} leaves no room for both groups in a table of {n_rows} rows: "
            "rows [:base_vocab_size] are base tokens and the rest new tokens, and each group needs at least 2 rows"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    tables = {"E_post": E_post}
    if E_pre is not None:
        E_pre = np.asarray(E_pre)
        if E_pre.shape != E_post.shape:
            raise ValueError(
                f"E_pre has shape {E_pre.shape} but E_post has {E_post.shape}: the pre-training snapshot must be "
                "taken from the same resized table (after new rows were added, before step 0)"
            )
        tables["E_pre"] = E_pre
    for name, table in tables.items():
        bad_rows = sum(int((~np.isfinite(table[start : start + 4096])).any(axis=1).sum())
                       for start in range(0, n_rows, 4096))
        if bad_rows:
            raise ValueError(f"{name} has {bad_rows} rows with NaN or inf values; the analysis needs finite tables")
    return E_post, E_pre


def _norms_section(norms: np.ndarray, n_base: int) -> dict:
    base, new = norms[:n_base], norms[n_base:]
    return {
        "base": metrics.describe(base),
        "new": metrics.describe(new),
        "all": metrics.describe(norms),
        "direction": "first sample = new (Wake) rows, second = base rows: positive t, d, g, rank_biserial mean new > base",
        "welch": metrics.welch_t_test(new, base),
        "mann_whitney": metrics.mann_whitney_u(new, base),
        "cohens_d": metrics.cohens_d(new, base),
        "hedges_g": metrics.hedges_g(new, base),
    }


def _isotropy_of(rows_view: np.ndarray, partition_rows: np.ndarray, moments, eigenvalues) -> dict:
    mean, scatter = moments
    n = rows_view.shape[0]
    log_mu = metrics.log_isotropy_mu(rows_view, metrics.second_moment_directions(mean, scatter, n))
    return {
        "n": int(n),
        "partition_ratio": metrics.partition_ratio(partition_rows),
        "partition_ratio_n": int(partition_rows.shape[0]),
        "mu": math.exp(log_mu),
        "mu_log10": log_mu / math.log(10.0),
        "isoscore": metrics.isoscore_from_variances(eigenvalues),
        "avg_cosine": metrics.avg_cosine(rows_view),
    }


def _isotropy_section(E: np.ndarray, n_base: int, full_moments: dict, full_spectra: dict,
                      seed: int) -> tuple[dict, dict]:
    """Every group measured on a seeded subsample of one common size n (see ISOTROPY_MAX_N).

    Where that subsample is a whole group (the smaller one, below the cap), the group's
    moments and spectrum from the PCA are reused: order does not change them."""
    groups = {"all": (0, E.shape[0]), "base": (0, n_base), "new": (n_base, E.shape[0])}
    n_common = min(n_base, E.shape[0] - n_base, ISOTROPY_MAX_N)
    n_partition = min(PARTITION_RATIO_SAMPLE, n_common)
    section = {}
    for name, (start, stop) in groups.items():
        group = E[start:stop]
        chosen = _stream(seed, f"isotropy/{name}").permutation(group.shape[0])[:n_common]
        # Sorted gathers read memory in order; the partition sample keeps the random order's
        # first rows so it is not biased towards low ids.
        partition_rows = group[np.sort(chosen[:n_partition])]
        if n_common == group.shape[0]:
            rows_view, moments, eigenvalues = group, full_moments[name], full_spectra[name]
        else:
            rows_view = group[np.sort(chosen)]
            moments = metrics.second_moments(rows_view)
            eigenvalues = metrics.covariance_eigenvalues(moments[1], n_common)
        section[name] = _isotropy_of(rows_view, partition_rows, moments, eigenvalues)
        del rows_view  # free this group's gathered copy (262 MB at full size) before the next
    meta = {
        "n_per_group": n_common,
        "cap": ISOTROPY_MAX_N,
        "why": "isotropy measures depend on n, so all, base and new are each measured on a seeded "
        "subsample of the same size: the smaller group's size, capped",
        "partition_ratio_n": n_partition,
        "partition_ratio_sample": "seeded subsample of each group's isotropy sample",
        "centred": {"partition_ratio": False, "mu": False, "avg_cosine": False, "isoscore": True},
    }
    return section, meta


def _pca_section(spectra: dict, sizes: dict) -> tuple[dict, dict]:
    section = {
        name: {"n": sizes[name], "dims": int(eigenvalues.size), **metrics.pca_summary(eigenvalues, TOP_EIGENVALUES)}
        for name, eigenvalues in spectra.items()
    }
    cumulative = {name: metrics.cumulative_variance_ratio(eigenvalues) for name, eigenvalues in spectra.items()}
    return section, cumulative


def _drift_of(cosines: np.ndarray, distances: np.ndarray, ids: np.ndarray, token_of) -> dict:
    most_drifted = np.lexsort((ids, cosines))[:TOP_DRIFTED]  # lowest cosine first, ties by id
    return {
        "cosine": metrics.describe(cosines),
        "l2": metrics.describe(distances),
        "n_unchanged": int(np.count_nonzero(distances == 0.0)),
        "top20": [
            {"id": int(ids[i]), "token": token_of(int(ids[i])), "cosine": float(cosines[i]), "l2": float(distances[i])}
            for i in most_drifted
        ],
    }


def _neighbors_section(E: np.ndarray, n_base: int, token_of, seed: int, counts=None) -> tuple[dict, dict]:
    """Wake rows drawn from the first, middle and last third of the new rows, each with its
    nearest base rows by cosine (and, given the new rows' training counts, its own)."""
    n_new = E.shape[0] - n_base
    bounds = np.linspace(0, n_new, 4).astype(int)
    rng = _stream(seed, "neighbors")
    segments = {
        segment: n_base + np.sort(rng.choice(np.arange(lo, hi), size=min(NEIGHBOR_QUERIES_PER_SEGMENT, hi - lo),
                                             replace=False))
        for segment, lo, hi in zip(("beginning", "middle", "end"), bounds[:-1], bounds[1:])
    }
    query_ids = np.concatenate(list(segments.values()))
    # One pass over the base rows for all queries.
    indices, cosines = metrics.nearest_by_cosine(E[query_ids], E[:n_base], NEIGHBOR_K)
    answers = {
        int(q): [{"id": int(j), "token": token_of(int(j)), "cosine": float(c)} for j, c in zip(row_ids, row_cos)]
        for q, row_ids, row_cos in zip(query_ids, indices, cosines)
    }
    section = {
        segment: [{"id": int(q), "token": token_of(int(q)),
                   **({} if counts is None else {"training_count": int(counts[q - n_base])}), "nearest_base": answers[int(q)]}
                  for q in ids]
        for segment, ids in segments.items()
    }
    meta = {"queries_per_segment": NEIGHBOR_QUERIES_PER_SEGMENT, "k": NEIGHBOR_K,
            "segments": "seeded draws from the first, middle and last third of the new rows"}
    return section, meta


def _pairwise_section(E: np.ndarray, n_base: int, seed: int) -> tuple[dict, dict, dict]:
    """Cosines of disjoint pairs: no token is in two pairs of the same distribution, so the
    pairs are independent and the KS test's sample sizes are honest."""
    base, new = E[:n_base], E[n_base:]
    n_pairs = min(n_base // 2, new.shape[0] // 2, MAX_PAIRS)
    first_b, second_b = metrics.disjoint_pairs(base.shape[0], n_pairs, _stream(seed, "pairs/base_base"))
    first_n, second_n = metrics.disjoint_pairs(new.shape[0], n_pairs, _stream(seed, "pairs/new_new"))
    cross = _stream(seed, "pairs/base_new")
    cross_b = cross.permutation(base.shape[0])[:n_pairs]
    cross_n = cross.permutation(new.shape[0])[:n_pairs]
    samples = {
        "base_base": metrics.paired_cosines(base, first_b, base, second_b),
        "new_new": metrics.paired_cosines(new, first_n, new, second_n),
        "base_new": metrics.paired_cosines(base, cross_b, new, cross_n),
    }
    section = {name: metrics.describe(values) for name, values in samples.items()}
    section["ks"] = metrics.ks_two_sample(samples["base_base"], samples["new_new"])
    meta = {"n_pairs": n_pairs, "cap": MAX_PAIRS,
            "scheme": "disjoint pairs: a seeded permutation cut into consecutive pairs; base_new pairs the first "
            "n_pairs of a permutation of each group. KS compares base_base with new_new at equal n, exactly"}
    return section, samples, meta


def _jsonable(value):
    """Plain Python types for json; non-finite floats become None (undefined, not NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _summarize(E_post, base_vocab_size: int, *, E_pre=None, tokens: Tokens = None, seed: int = 0, pairs_file=None,
               groups=None, group_names=None, train_counts=None):
    """(summary, figure data, source-rank figure data or None, morphology figure data or None):
    the figures draw the same arrays the summary describes."""
    E_post, E_pre = _validate(E_post, base_vocab_size, E_pre, seed)
    # A bad pairs file fails before any of the slow work.
    user_pairs = source_pairs.read_pairs(pairs_file) if pairs_file is not None else None
    if user_pairs is not None and tokens is None:
        raise source_pairs.PairsFileError(f"--pairs={pairs_file} needs token names to find the words' rows: "
                                          "give the tokenizer (--tokenizer, or a workdir with one)")
    n_rows, dim = E_post.shape
    n_base = int(base_vocab_size)
    counts = seen_split.new_row_counts(train_counts, n_rows, n_base)
    token_of = _token_lookup(tokens)
    sizes = {"base": n_base, "new": n_rows - n_base}

    norms = metrics.row_norms(E_post)
    full_moments = {"base": metrics.second_moments(E_post[:n_base]), "new": metrics.second_moments(E_post[n_base:])}
    full_spectra = {name: metrics.covariance_eigenvalues(moments[1], sizes[name]) for name, moments in full_moments.items()}
    pca, cumulative = _pca_section(full_spectra, sizes)
    isotropy, isotropy_meta = _isotropy_section(E_post, n_base, full_moments, full_spectra, seed)
    neighbors, neighbors_meta = _neighbors_section(E_post, n_base, token_of, seed, counts)
    pairwise, pair_samples, pairs_meta = _pairwise_section(E_post, n_base, seed)
    ranks, ranks_meta, figure_ranks = None, "not computed: no token names", None
    if tokens is not None:
        ranks, ranks_meta, figure_ranks = source_rank.section(
            E_post, E_pre, n_base, token_of, user_pairs=user_pairs, rng=_stream(seed, "source_rank/edit_distance"))
        if user_pairs is not None:
            ranks_meta["user_file"] = str(pairs_file)

    # meta is filled last but kept as the first key, so it heads the file.
    summary = {"meta": None, "norms": _norms_section(norms, n_base), "isotropy": isotropy}
    if counts is not None:
        summary["norms"].update(seen_split.norms(norms[n_base:], counts))
    drift_base_cosines = None
    if E_pre is not None:
        cosines, distances = metrics.row_cosines(E_pre, E_post), metrics.row_distances(E_pre, E_post)
        summary["drift"] = {
            "base": _drift_of(cosines[:n_base], distances[:n_base], np.arange(n_base), token_of),
            "new": _drift_of(cosines[n_base:], distances[n_base:], np.arange(n_base, n_rows), token_of),
        }
        if counts is not None:
            summary["drift"].update(seen_split.drift(cosines[n_base:], distances[n_base:], counts, n_base,
                                                     lambda c, d, ids: _drift_of(c, d, ids, token_of)))
        drift_base_cosines = cosines[:n_base]
    summary["neighbors"] = neighbors
    summary["pca"] = pca
    summary["pairwise_cosine"] = pairwise
    summary["source_rank"] = ranks
    morphology_figure = None
    if groups is not None:
        summary["morphology"], morphology_figure = morphology.section(
            E_post, groups, _stream(seed, "morphology/device_words"), E_pre=E_pre, names=group_names)
    summary["meta"] = {
        "shapes": {"post": [n_rows, dim], "pre": list(E_pre.shape) if E_pre is not None else None},
        "dtype": str(E_post.dtype),
        "base_vocab_size": n_base,
        "n_base": sizes["base"],
        "n_new": sizes["new"],
        "dims": dim,
        "seed": int(seed),
        "zero_rows": int(np.count_nonzero(norms == 0.0)),
        "tokens_given": tokens is not None,
        "train_counts_given": counts is not None,
        "sampling": {
            "norms": "all rows",
            "drift": "all rows" if E_pre is not None else "not computed: no E_pre",
            "pca": "all rows of each group, full covariance spectrum, never capped",
            "isotropy": isotropy_meta,
            "pairwise_cosine": pairs_meta,
            "neighbors": neighbors_meta,
            "source_rank": ranks_meta,
        },
        "conventions": {
            "std": "sample standard deviation (ddof=1)",
            "zero_rows": "an all-zero row has cosine 0 with every row",
            "quantiles": "numpy linear interpolation",
            "p_values": "log10_p is computed in log space and exact; p is null where it is below float64's "
            "smallest normal number (2.2e-308), never reported as 0",
            "mann_whitney": "normal approximation with tie and continuity corrections (scipy's asymptotic method)",
            "ks": "exact two-sided null distribution for equal sample sizes (Gnedenko-Korolyuk)",
            "mu": "Mu & Viswanath (2018): Z(c) = sum_w exp(c . v_w) over raw vectors, c over the eigenvectors "
            "of V^T V and their negatives; mu = min Z / max Z",
            "partition_ratio": "the original study's statistic: Z_i = sum_{j != i} exp(cos(v_i, v_j)) over a "
            "sample of raw (uncentred) vectors; min Z / max Z",
            "isoscore": "Rudman et al. (2022), from the covariance eigenvalues (centred)",
            "source_rank": "per pair group: median rank of the English source among the Wake row's cosine "
            "neighbours in the base rows, and the share ranked within the top 5 / top 50; post = the trained "
            "table, pre = the snapshot before step 0 (null without it)",
        },
        "versions": {"wake2vec": wake2vec.__version__, "numpy": np.__version__, "scipy": scipy.__version__},
    }
    figure_data = FigureData(
        norms=norms,
        base_vocab_size=n_base,
        pair_cosines=pair_samples,
        ks=pairwise["ks"],
        cumulative_variance=cumulative,
        k90={name: pca[name]["k90"] for name in cumulative},
        k95={name: pca[name]["k95"] for name in cumulative},
        top_eigenvalues={name: np.asarray(pca[name]["top_eigenvalues"]) for name in cumulative},
        base_drift_cosines=drift_base_cosines,
    )
    source_rank_figure = None if figure_ranks is None else (figure_ranks, n_base)
    return _jsonable(summary), figure_data, source_rank_figure, morphology_figure


def analyze(E_post, base_vocab_size: int, *, E_pre=None, tokens: Tokens = None, seed: int = 0,
            pairs_file=None, groups=None, group_names=None, train_counts=None) -> dict:
    """The embedding-space analysis of a trained table, as a JSON-ready dict.

    Args:
      E_post: (V, D) float array, the trained table; rows [:base_vocab_size] are the base
        vocabulary, rows [base_vocab_size:] the new (Wake) tokens.
      base_vocab_size: number of base rows; each group needs at least 2 rows.
      E_pre: optional (V, D) snapshot taken before step 0; enables the `drift` section.
      tokens: optional id -> token string, as a sequence indexed by id or a mapping; ids it
        lacks, or tokens=None, give null token names.
      seed: fixes every subsample; the same inputs and seed give the same summary.
      pairs_file: optional file of 'WAKE ENGLISH' lines (source_pairs.read_pairs), ranked as
        the `user` group beside the built-in and edit-distance pairs; needs `tokens`.
      groups: optional Phase 3 groups, an alignment.AlignmentData (groups.alignment_data);
        adds the `morphology` section: morpheme-direction consistency and device-group
        separation, on E_post and (with E_pre) on E_pre.
      group_names: optional {"morph": [...], "device": [...]} labels of those groups
        (alignment_data's stats["group_names"]); numbered otherwise.
      train_counts: optional per-new-row occurrences in the training blocks (or one count per
        row); adds norms.new_seen / new_unseen, drift.new_seen / new_unseen (None for an
        empty group) and each neighbour query's training_count (analysis.seen_split).

    Returns the summary with keys meta, norms, isotropy, drift (with E_pre), neighbors, pca,
    pairwise_cosine (see ../shared/ORIGINAL.md and the conventions recorded in meta),
    source_rank (null without tokens), and morphology (only with groups).
    """
    summary, _, _, _ = _summarize(E_post, base_vocab_size, E_pre=E_pre, tokens=tokens, seed=seed, pairs_file=pairs_file,
                                  groups=groups, group_names=group_names, train_counts=train_counts)
    return summary


def write_summary(summary: dict, path) -> None:
    """Strict JSON (allow_nan=False), UTF-8, written to a temporary file and renamed into
    place so a reader never sees half a summary."""
    path = pathlib.Path(path)
    text = json.dumps(summary, allow_nan=False, indent=2, ensure_ascii=False)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)


def run_analysis(E_post, base_vocab_size: int, out_dir, *, E_pre=None, tokens: Tokens = None, seed: int = 0,
                 source: Mapping | None = None, pairs_file=None, groups=None, group_names=None,
                 vs_base: Mapping | None = None, train_counts=None) -> dict:
    """analyze(), then writes out_dir/summary.json, out_dir/embedding_analysis.png, with
    token names out_dir/source_ranks.png, and with groups out_dir/morphology.png.

    `source` (for example {"workdir": ..., "step": ...}) is recorded as meta.source, so a
    summary says which table it describes. `vs_base` (the table's last evaluation against the
    base model, wake2vec.phases.base_cost) is recorded as the vs_base section. Returns the summary.
    """
    summary, figure_data, source_rank_figure, morphology_figure = _summarize(
        E_post, base_vocab_size, E_pre=E_pre, tokens=tokens, seed=seed, pairs_file=pairs_file, groups=groups,
        group_names=group_names, train_counts=train_counts)
    if source is not None:
        summary["meta"]["source"] = _jsonable(dict(source))
    if vs_base is not None:
        summary["vs_base"] = _jsonable(dict(vs_base))
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_summary(summary, out_dir / SUMMARY_FILENAME)
    plot_embedding_analysis(figure_data, out_dir / FIGURE_FILENAME)
    if source_rank_figure is not None:
        plot_source_ranks(*source_rank_figure, out_dir / SOURCE_RANK_FIGURE_FILENAME)
    if morphology_figure is not None:
        plot_morphology(morphology_figure, out_dir / MORPHOLOGY_FIGURE_FILENAME)
    return summary

