"""Runs the training launcher while recording every file it writes under --workdir.

    python -m tests.audited_launch AUDIT_LOG [LAUNCHER] -- <launcher flags>

LAUNCHER is train_p1 (the default), train_p2 or train_p3.

A Python audit hook (sys.addaudithook) sees every `open` for writing, rename, mkdir and
removal the launcher's Python code makes; each one under the workdir is appended to
AUDIT_LOG as a JSON line {"event", "path"} (paths relative to the workdir), so
tests/test_multihost.py can check which process wrote what. Orbax's array data is written
by tensorstore in C++ and is not seen; checkpoints are collective by design anyway.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _writes(event: str, args: tuple):
    """The paths an audit event writes, or ()."""
    if event == "open":
        path, mode, flags = args
        if isinstance(mode, str):
            writing = any(c in mode for c in "wax+")
        else:
            writing = bool(flags & _WRITE_FLAGS)
        return (path,) if writing and isinstance(path, (str, bytes, os.PathLike)) else ()
    if event == "os.rename":
        return (args[1],)
    if event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        return (args[0],)
    return ()


def main() -> None:
    log_path, *rest = sys.argv[1:]
    launcher = "train_p1" if rest[0] == "--" else rest.pop(0)
    separator, *flags = rest
    assert separator == "--", sys.argv
    workdir = next(os.path.abspath(f.split("=", 1)[1]) for f in flags if f.startswith("--workdir="))
    log = open(log_path, "a", encoding="utf-8", buffering=1)

    def hook(event, args):
        for path in _writes(event, args):
            path = os.path.abspath(os.fsdecode(path))
            if path == workdir or path.startswith(workdir + os.sep):
                log.write(json.dumps({"event": event, "path": os.path.relpath(path, workdir)}) + "\n")

    sys.addaudithook(hook)
    sys.argv = [f"experiments.{launcher}", *flags]
    runpy.run_module(f"experiments.{launcher}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
