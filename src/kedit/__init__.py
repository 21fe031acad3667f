"""kedit: locate-then-edit knowledge editing for causal language models."""

__version__ = "0.1.0"

from kedit.arch import ArchitectureAdapter  # noqa: E402
from kedit.edit import Edit  # noqa: E402
from kedit.editor import Editor  # noqa: E402
from kedit.errors import (  # noqa: E402
    BadRequest,
    DatasetFormatError,
    EditFailed,
    KeditError,
    ModelNotFound,
    StatsCacheError,
    UnsupportedArchitecture,
)
from kedit.models import load_model  # noqa: E402
from kedit.requests import EditRequest, read_requests  # noqa: E402

__all__ = [
    "ArchitectureAdapter", "BadRequest", "DatasetFormatError", "Edit", "EditFailed", "EditRequest", "Editor",
    "KeditError", "ModelNotFound", "StatsCacheError", "UnsupportedArchitecture", "load_model", "read_requests",
]
