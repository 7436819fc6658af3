"""How every experiments/ launcher starts, reads its flags, logs and fails: one place.

A launcher is a frozen config dataclass plus `command(cfg) -> str | None`; `launch` does
the rest the same way for all of them:

* flags: one per field of the dataclass (wake2vec.flags), parsed into a private
  FlagValues, so importing a launcher (tests, other launchers) never defines a flag and
  two launchers never collide; `--flagfile` works as in absl;
* `--help` prints the launcher's docstring verbatim (its example lines stay apart) and
  its own flags, and exits 0 before anything heavy (JAX's backends, transformers, Orbax)
  is imported;
* logging: wake2vec's progress and every library's real warnings. Orbax's INFO
  narration, JAX's "Unable to initialize backend" probe and Orbax's "Given directory is
  read only" (said of every read-only open, which is how analyze / generate / export
  read checkpoints) are noise to a user; `--verbosity=1` shows them, 2 adds DEBUG;
* paths: `~` is expanded in every field the config lists in PATH_FIELDS;
* failures: a `UserError` (bad input, a full disk, a changed source: the user can act)
  is one line on stderr and exit 1; a flag that does not parse is one line and exit 2;
  Ctrl-C is "interrupted; rerun the same command to resume" and exit 130; anything else
  is a bug and keeps its traceback, an XLA out-of-memory with one more line naming the
  flags that shrink memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import sys
import traceback
from typing import Callable, Sequence, TypeVar

from absl import flags as absl_flags

from wake2vec import flags as config_flags
from wake2vec.errors import UserError

T = TypeVar("T")

EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_PEER_LOST = 3  # another process of a multi-host run died
INTERRUPTED = "interrupted; rerun the same command to resume"
OOM_HINT = (
    "out of device memory: store the frozen body smaller (--frozen_dtype=bfloat16), recompute "
    "activations (--remat=full), or take fewer blocks per microbatch (lower --batch_size, raise --grad_accum)"
)
HELP_FLAGS = frozenset({"--help", "-help", "-h", "--helpshort", "--helpfull", "-?"})

# Our code is wake2vec/ and the launchers' experiments/, wherever they are installed (a checkout or
# site-packages); anything else that logs is a library.
_OUR_DIRS = tuple(str(pathlib.Path(__file__).resolve().parents[1] / name) + os.sep for name in ("wake2vec", "experiments"))
_NOISE = ("Given directory is read only", "Unable to initialize backend")


@dataclasses.dataclass(frozen=True)
class LauncherOptions:
    """Flags every launcher has besides its own config."""

    # 0: wake2vec's progress and real warnings; 1: every library's INFO as well (Orbax, JAX); 2: DEBUG.
    verbosity: int = 0


class _ConsoleFilter(logging.Filter):
    """At verbosity 0: our own INFO and above, other libraries' WARNING and above, no noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = os.path.realpath(record.pathname).startswith(_OUR_DIRS)
        if ours:
            return True
        return record.levelno >= logging.WARNING and not record.getMessage().startswith(_NOISE)


_handler: logging.Handler | None = None


def setup_logging(verbosity: int) -> None:
    """One stderr handler on the root logger (replacing any earlier one).

    A library that logged while it was imported (Orbax does, through absl) has already made
    logging.basicConfig install a default handler, which would print every line twice.
    """
    global _handler
    root = logging.getLogger()
    for earlier in list(root.handlers):
        root.removeHandler(earlier)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    if verbosity <= 0:
        _handler.addFilter(_ConsoleFilter())
    root.addHandler(_handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    # Libraries that read absl's global flags (absl.logging does) must not find them unparsed.
    if not absl_flags.FLAGS.is_parsed():
        absl_flags.FLAGS.mark_as_parsed()


def usage(config_cls: type, doc: str, prog: str) -> str:
    """The --help text: the docstring as written, then this launcher's flags."""
    return "\n".join([
        (doc or "").strip("\n"),
        "",
        f"flags of {prog}:",
        config_flags.help_listing(config_cls),
        "",
        "flags of every launcher:",
        config_flags.help_listing(LauncherOptions),
        "  --flagfile=FILE",
        "      Read more flags from FILE, one per line.",
        "",
    ])


def is_out_of_memory(error: BaseException) -> bool:
    """XLA reports device OOM as a runtime error whose message carries RESOURCE_EXHAUSTED."""
    text = str(error)
    return "RuntimeError" in type(error).__name__ and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text)


_PEER_LOST_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Gloo", "gloo", "coordination service",
                    "heartbeat", "Socket closed")


def lost_peer_message(error: BaseException) -> str | None:
    """The one line for a collective that failed because another process of a multi-host run
    died (kill -9, a lost VM); None for every other error."""
    jax = sys.modules.get("jax")
    if jax is None or not any(sign in str(error) for sign in _PEER_LOST_SIGNS):
        return None
    try:
        me, count = jax.process_index(), jax.process_count()
    except Exception:  # the runtime itself is gone
        return None
    if count < 2:
        return None
    others = "process " + str(1 - me) if count == 2 else f"one of the other {count - 1} processes"
    reason = _one_line(error)[:160]
    return (f"lost contact with {others} of the run (this is process {me} of {count}): {reason}; nothing committed "
            "is lost: restart every process with the same command to resume")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(
    config_cls: type[T],
    command: Callable[[T], str | None],
    doc: str,
    argv: Sequence[str] | None = None,
    *,
    adjust: Callable[[T, set[str]], T] | None = None,
) -> int:
    """Parses argv into a `config_cls`, runs `command` on it and returns the exit code.

    `adjust(cfg, explicitly_set_fields)` may rewrite the config before it runs (the demo
    preset fills the fields the user did not set). What `command` returns is printed.
    """
    argv = list(sys.argv if argv is None else argv)
    prog = pathlib.Path(argv[0]).stem if argv else "launcher"
    if HELP_FLAGS & {arg.split("=", 1)[0] for arg in argv[1:]}:
        try:
            print(usage(config_cls, doc, prog))
        except BrokenPipeError:  # `--help | head`
            pass
        return 0
    flag_values = absl_flags.FlagValues()
    config_flags.define_flags(config_cls, flag_values)
    config_flags.define_flags(LauncherOptions, flag_values)
    try:
        rest = flag_values(argv)
    except absl_flags.Error as error:
        print(f"{prog}: {_one_line(error)}; see --help", file=sys.stderr)
        return EXIT_USAGE
    if len(rest) > 1:
        print(f"{prog}: unexpected arguments {rest[1:]}; every setting is a --flag (see --help)", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config_flags.config_from_flags(LauncherOptions, flag_values).verbosity)
    try:
        cfg = expand_paths(config_flags.config_from_flags(config_cls, flag_values))
        if adjust is not None:
            cfg = adjust(cfg, config_flags.explicitly_set(config_cls, flag_values))
        message = command(cfg)
    except UserError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        lost = lost_peer_message(error)
        if lost:
            # Not a normal exit: JAX's exit handler would wait for the dead process at its shutdown
            # barrier (minutes) and then abort. Checkpoints are committed atomically, so none is lost.
            print(f"error: {lost}", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(EXIT_PEER_LOST)
        if not is_out_of_memory(error):
            raise
        traceback.print_exc()
        print(OOM_HINT, file=sys.stderr)
        return EXIT_USER_ERROR
    if message:
        print(message)
    return 0


def launch(config_cls: type[T], command: Callable[[T], str | None], doc: str, *,
           adjust: Callable[[T, set[str]], T] | None = None) -> None:
    """`main` on sys.argv, then exit with its code (a launcher's `if __name__ == "__main__"`)."""
    sys.exit(main(config_cls, command, doc, adjust=adjust))


def expand_paths(cfg: T) -> T:
    """Path fields (the config's PATH_FIELDS) as the user meant them: `~` expanded, since
    the shell does not expand the `~` of `--workdir=~/runs`."""
    names = getattr(type(cfg), "PATH_FIELDS", ())
    return dataclasses.replace(cfg, **{name: os.path.expanduser(getattr(cfg, name)) for name in names})
