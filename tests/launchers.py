"""Every launcher by name, and `invoke`: one launcher run in this process, as its command line runs it.

In-process runs skip a Python start and the imports of JAX, Orbax and transformers (a few
CPU-seconds a launch) and reuse what this worker has compiled. Tests that need a real signal,
a killed process or a second host still start a subprocess.
"""

from __future__ import annotations

import subprocess

from experiments import analyze, build_lexicon, export_hf, generate as generate_cli, train_p1, train_p2, train_p3
from wake2vec import launcher
from wake2vec.config import Phase2Config, Phase3Config, TrainConfig

LAUNCHERS = {
    "train": (TrainConfig, train_p1.run, train_p1.__doc__, train_p1.demo_preset),
    "analyze": (analyze.AnalyzeConfig, analyze.run, analyze.__doc__, None),
    "generate": (generate_cli.GenerateConfig, generate_cli.run, generate_cli.__doc__, None),
    "export": (export_hf.ExportConfig, export_hf.run, export_hf.__doc__, None),
    "lexicon": (build_lexicon.BuildLexiconConfig, build_lexicon.run, build_lexicon.__doc__, None),
    "train_p2": (Phase2Config, train_p2.run, train_p2.__doc__, train_p2.demo_preset),
    "train_p3": (Phase3Config, train_p3.run, train_p3.__doc__, train_p3.demo_preset),
}


def invoke(name: str, *args: str) -> int:
    """The exit code of launcher `name` on `args`; what it prints goes to this process's stdout and stderr."""
    config_cls, command, doc, adjust = LAUNCHERS[name]
    return launcher.main(config_cls, command, doc, [name, *args], adjust=adjust)


def run_here(capsys, name: str, *args: str) -> subprocess.CompletedProcess:
    """`invoke` with what it printed, as `subprocess.run(..., capture_output=True, text=True)` returns it."""
    capsys.readouterr()
    code = invoke(name, *args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([name, *args], code, out, err)
