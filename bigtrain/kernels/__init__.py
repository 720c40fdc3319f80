"""bigtrain fused-attention kernels (Triton), imported as ``bigtrain.kernels``.

Public API::

    flash_attn(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None,
               segment_ids=None, dropout_p=0.0) -> Tensor
    segment_ids_context(segment_ids)        # packed documents for transformers models
    document_bounds(segment_ids)            # per-token document bounds, once per batch
    register_with_transformers()            # explicit, idempotent registration
    flash_attn_dropout_mask(...), draw_dropout_seed()   # dropout debugging / tests
    set_deterministic(flag)                 # default backward variant (model.attn_deterministic)

Importing this package is cheap: it imports torch only. Triton is imported (and kernels
compiled) on the first :func:`flash_attn` call. The transformers attention implementation
``"bigtrain_triton"`` is registered as soon as transformers' ``modeling_utils`` and
``masking_utils`` are loaded: immediately if they already are, otherwise by a small import hook
that runs after they finish loading, so that importing bigtrain does not pay for importing
transformers. See docs/kernels.md.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

from .attention import document_bounds, draw_dropout_seed, flash_attn, flash_attn_dropout_mask, set_deterministic
from .transformers_integration import (
    ATTN_IMPLEMENTATION,
    bigtrain_triton_attention,
    bigtrain_triton_mask,
    register_with_transformers,
    segment_ids_context,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "bigtrain_triton_attention",
    "bigtrain_triton_mask",
    "document_bounds",
    "draw_dropout_seed",
    "flash_attn",
    "flash_attn_dropout_mask",
    "register_with_transformers",
    "segment_ids_context",
    "set_deterministic",
]

_WATCHED = ("transformers.modeling_utils", "transformers.masking_utils")


def _transformers_ready() -> bool:
    mu, mk = (sys.modules.get(n) for n in _WATCHED)
    return hasattr(mu, "AttentionInterface") and hasattr(mk, "AttentionMaskInterface")


class _RegisterAfterLoad(importlib.abc.Loader):
    """Wraps the real loader of a watched module; registers once both are fully executed."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        if _transformers_ready():
            _uninstall_hook()
            register_with_transformers()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self._inner, name)


class _TransformersImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


_hook = _TransformersImportHook()


def _uninstall_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


if _transformers_ready():
    register_with_transformers()
else:
    sys.meta_path.insert(0, _hook)
