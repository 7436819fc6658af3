"""Post-training analysis of an embedding table (ORIGINAL.md's seven analyses).

metrics.py holds pure functions (arrays -> numbers), report.py composes them into the
summary dict and writes summary.json, plots.py draws the six-panel figure and the
source-rank figure; source_pairs.py and source_rank.py rank each coinage's English source
among its nearest base tokens; morphology.py measures Phase 3's groups (given `groups=`).

    from wake2vec import analysis
    summary = analysis.analyze(E_post, base_vocab_size, E_pre=E_pre, tokens=id_to_token)
    analysis.run_analysis(E_post, base_vocab_size, out_dir, E_pre=E_pre, tokens=id_to_token)
"""

from wake2vec.analysis import metrics
from wake2vec.analysis.report import analyze, run_analysis, write_summary

__all__ = ["analyze", "metrics", "run_analysis", "write_summary"]
