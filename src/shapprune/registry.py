"""The one lazy import behind every registry of string names (methods, method checks, estimators)."""

from __future__ import annotations

import importlib


def load(target: str):
    """The object a registry entry ``"package.module:name"`` names, importing its module only now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
