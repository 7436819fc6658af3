"""The new-token usage of a workdir's generations.json, as the analysis launcher logs it."""

from __future__ import annotations

import json
import pathlib


def generation_usage_headline(workdir) -> str:
    """The new-token usage of W/generations.json, one line per sample."""
    from wake2vec.models import generate  # the writer owns the file's name and format (and imports JAX)

    path = pathlib.Path(workdir) / generate.GENERATIONS_JSON
    if not path.is_file():
        return f"new-token usage in generations: {path} not found (python -m experiments.generate --workdir=...)"
    record = json.loads(path.read_text(encoding="utf-8"))
    if record["distinct_new_all_temperatures"] is None:
        return f"new-token usage in generations: not counted in {path} (no base vocabulary size)"
    lines = [f"new-token usage in generations ({path}):"]
    several = record["settings"].get("samples per temperature", 1) > 1
    for entry in record["samples"]:
        usage = entry["usage"]
        share = "n/a" if usage["share_new"] is None else f"{usage['share_new']:.1%}"
        label = f"temperature {entry['temperature']:g}" + (f", sample {entry['sample'] + 1}" if several else "")
        lines.append(f"  {label}: {usage['new_tokens']} of {usage['generated_tokens']} "
                     f"tokens new ({share}), {usage['distinct_new']} distinct")
    lines.append(f"  distinct new tokens over all temperatures: {record['distinct_new_all_temperatures']}")
    return "\n".join(lines)
