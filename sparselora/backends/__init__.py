"""Backend registry: each backend says what it supports and how to run a packed linear.

A kernel developer adds a backend by subclassing :class:`Backend` and calling
:func:`register_backend`; :class:`sparselora.SparseLinear`, the conformance tests and the
benchmarks pick it up from the registry without edits elsewhere.
"""
from __future__ import annotations

from .base import (Backend, BackendChoice, RESIDENT_CANONICAL, RESIDENT_OWN, register_backend, get_backend, list_backends,
                   choose_backend)
from . import reference  # noqa: F401  (registers "reference")

__all__ = ["Backend", "BackendChoice", "RESIDENT_CANONICAL", "RESIDENT_OWN", "register_backend", "get_backend", "list_backends", "choose_backend"]
