"""Register sparselora's quantization method with transformers without importing transformers.

``import sparselora`` must stay light (the CLI's ``--help`` imports no transformers), yet
``from_pretrained`` of a packed directory must find the method whenever sparselora was imported.
So: if ``transformers.quantizers.auto`` (the module holding transformers' quantizer registry) is
already imported, register now; otherwise a post-import hook registers right after it loads.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TARGET = "transformers.quantizers.auto"


def _register() -> None:
    partial = sys.modules.get(__package__ + ".hf_quantizer")
    if partial is not None and not hasattr(partial, "register"):
        return  # hf_quantizer itself is importing transformers: it registers when it finishes
    from . import hf_quantizer

    hf_quantizer.register()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``transformers.quantizers.auto`` so that the
    registration runs once that module has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _register()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
