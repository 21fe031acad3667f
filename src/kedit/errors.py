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


class EditOrderError(KeditError):
    """An edit cannot be undone because later edits on the same layers are still applied."""


class PatchError(KeditError):
    """A patch file is unreadable, corrupted (digest mismatch) or has malformed metadata; names the file."""


class NotWritable(KeditError):
    """An output path or cache directory cannot be written; the message names it."""


class InputFileError(KeditError, ValueError):
    """An input file cannot be read as text (not UTF-8) or is not the kind of file expected."""


class ModelFileError(KeditError):
    """A model file or directory is unreadable (garbage GGUF) or its cache failed verification."""


class ReportFormatError(KeditError, ValueError):
    """An evaluation report file (summary.json) is corrupt; the message names the file."""


class CacheNotWritable(UserWarning):
    """A cache could not be written; the computed result is used in memory for this run."""


_warned_cache_dirs: set[str] = set()


def warn_cache_unwritable(what: str, path: object, err: BaseException) -> None:
    """Warn once per cache directory that ``what`` is kept in memory only (``path`` could not be written)."""
    import warnings
    from pathlib import Path

    folder = str(Path(str(path)).parent)
    if folder in _warned_cache_dirs:
        return
    _warned_cache_dirs.add(folder)
    warnings.warn(f"cannot write the {what} cache at {path} ({type(err).__name__}: {err}); "
                  "using the result in memory for this run (set KEDIT_HOME to a writable directory to keep it)",
                  CacheNotWritable, stacklevel=3)


class UsageError(KeditError, ValueError):
    """A command-line flag or flag combination is invalid; the message names the flag and what to do."""


class ExportError(KeditError):
    """An edited checkpoint cannot be written: the destination (named) exists, is unwritable or too small."""
