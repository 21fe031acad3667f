"""kedit: locate-then-edit knowledge editing for causal language models.

The public names below are imported on first use, so ``import kedit`` (e.g. for ``kedit.__version__``
or ``kedit --version``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kedit._version import __version__

if TYPE_CHECKING:
    from kedit.arch import ArchitectureAdapter
    from kedit.edit import Edit
    from kedit.editor import Editor
    from kedit.errors import (
        BadRequest,
        DatasetFormatError,
        EditFailed,
        EditOrderError,
        ExportError,
        KeditError,
        ModelLoadError,
        ModelNotFound,
        PatchError,
        StatsCacheError,
        UnsupportedArchitecture,
    )
    from kedit.models import load_model
    from kedit.requests import EditRequest, read_requests

# public name -> module defining it
_LAZY = {
    "ArchitectureAdapter": "kedit.arch", "Edit": "kedit.edit", "Editor": "kedit.editor",
    "load_model": "kedit.models", "EditRequest": "kedit.requests", "read_requests": "kedit.requests",
    **{name: "kedit.errors" for name in (
        "BadRequest", "DatasetFormatError", "EditFailed", "EditOrderError", "ExportError", "KeditError",
        "ModelLoadError", "ModelNotFound", "PatchError", "StatsCacheError", "UnsupportedArchitecture")},
}

__all__ = [  # literal for linters and type checkers; test_public_names_match checks it against _LAZY
    "__version__",
    "ArchitectureAdapter", "BadRequest", "DatasetFormatError", "Edit", "EditFailed", "EditOrderError",
    "EditRequest", "Editor", "ExportError", "KeditError", "ModelLoadError", "ModelNotFound", "PatchError",
    "StatsCacheError", "UnsupportedArchitecture", "load_model", "read_requests",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'kedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
