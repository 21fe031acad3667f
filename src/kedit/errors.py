"""Typed errors. Each one names the culprit (file, line, module, field) in its message."""


class KeditError(Exception):
    """Base class of every error kedit raises on purpose."""


class UnsupportedArchitecture(KeditError):
    """The model's module structure could not be mapped (says what was looked for and found)."""


class BadRequest(KeditError, ValueError):
    """An edit request is malformed: missing `{}`, absent subject, empty target, conflicts."""


class StatsCacheError(KeditError):
    """A statistics cache file is unreadable, truncated or does not match its key."""


class DatasetFormatError(KeditError, ValueError):
    """A dataset record is malformed; the message names the file, record index and field."""


class ModelNotFound(KeditError):
    """`load_model` could not resolve a name; the message lists what is available."""


class ModelLoadError(KeditError, ValueError):
    """`load_model` options cannot be honoured (dtype, device, device_map, offload folder); checked before loading."""


class EditFailed(KeditError):
    """Applying an edit failed part-way; every touched weight has been restored."""
