"""wake2vec: teach a pretrained Llama new words by training only its embedding table.

The modules live in floors: `wake2vec.models` (the frozen body), `wake2vec.tokens` (new words into a
tokenizer), `wake2vec.training` (step, optimizer, loop, checkpoints), `wake2vec.phases` (what each phase
adds), `wake2vec.analysis` and `wake2vec.demo`. The flat names of release 0.1 (`wake2vec.loop`,
`from wake2vec import vocab`) still import, with a DeprecationWarning, for one release.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

_FLOORS = {
    "models": ("model", "model_config", "convert", "gguf_model", "quant", "lora", "lora_spec", "decode", "generate",
               "padding"),
    "tokens": ("vocab", "whole_word", "segmentation", "words", "lexicon_builder"),
    "training": ("train", "optim", "loop", "parallel", "hosts", "checkpoint", "workdir", "tboard", "precision",
                 "data"),
    "phases": ("prepare", "phase2", "phase3", "alignment", "groups", "distill", "runs"),
}
MOVED = {f"{__name__}.{module}": f"{__name__}.{floor}.{module}" for floor, modules in _FLOORS.items()
         for module in modules}


def _warn_moved(old: str) -> None:
    warnings.warn(f"{old} moved to {MOVED[old]}; the old name goes in the next release", DeprecationWarning,
                  stacklevel=3)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `import wake2vec.loop` with the one module object of `wake2vec.training.loop`, so that
    patching either name patches the same thing."""

    def __init__(self):
        self._own_specs = {}

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        _warn_moved(spec.name)
        module = importlib.import_module(MOVED[spec.name])
        self._own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # Already executed under its new name; the import system stamped the old name's spec on it.
        module.__spec__ = self._own_specs.pop(module.__spec__.name)


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name: str):
    # `import wake2vec; wake2vec.loop` (an attribute, not an import statement) takes the same path.
    if f"{__name__}.{name}" in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
