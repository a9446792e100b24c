"""The errors sdm raises for bad input: one small hierarchy, one line each.

Every error the Python API raises for something the caller gave it (a file, a
column, a value, a config field, an output path) is an `SdmError`; the CLI
prints it as one `error: ...` line and exits with code 1. The subclasses say
what kind of problem it is, for callers who want to tell them apart:

    SdmError            anything wrong with the caller's input (a ValueError)
      ConfigError       a config field or flag value out of bounds, unknown or inconsistent
      DataError         a file sdm reads is missing, damaged, foreign or fails its hash
      OutputError       an output path sdm refuses to write (overlaps an input, foreign files, not empty)
        LockedError     another sdm process is writing the same output
      StorageError      the operating system refused a write or read (no space, read-only, permission)

The message names the file, column or value, fits on one line, and makes sense
without a traceback.
"""



def _from_worker(text: str) -> bool:
    """A message torch built when it re-raised a DataLoader worker's error in the main process."""
    first = text.split("\n", 1)[0]
    return first.startswith("Caught ") and " in DataLoader worker" in first


class SdmError(ValueError):
    """A problem with the user's input (file, column, value, config).

    A torch DataLoader worker re-raises an error in the main process as
    `SdmError("Caught SdmError in DataLoader worker process 0.\\nOriginal
    Traceback ...\\nsdm.errors.SdmError: <message>")`; such a message is cut
    back to the original one line.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and _from_worker(args[0]):
            last = args[0].rstrip().splitlines()[-1]
            args = (last.split("Error: ", 1)[-1],)
        super().__init__(*args)


class ConfigError(SdmError):
    """A config field or flag value is out of bounds, unknown, or inconsistent with another."""


class DataError(SdmError):
    """A file sdm reads (log, manifest, shard, checkpoint, export file) is missing, damaged or foreign."""


class OutputError(SdmError):
    """An output path sdm refuses: it overlaps an input, holds foreign files, or is not empty without --overwrite."""


class LockedError(OutputError):
    """Another sdm process holds the lock of the same output."""


class StorageError(SdmError):
    """The operating system refused to read or write a path (no space left, read-only, permission)."""


def storage_error(exc: OSError, path: object | None = None) -> StorageError:
    """One-line `StorageError` for an OSError, naming the path (the error's own, else `path`)."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or type(exc).__name__
    return StorageError(f"{where}: {reason}" if where is not None else reason)


def first_line(exc: BaseException) -> str:
    """An exception's message as one line of at most 300 characters, for one-line errors.

    A pydantic error gives its first field and reason; a message whose first line
    only announces the details ("Error(s) in loading state_dict for SDM:") keeps
    the first detail line too.
    """
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        first = exc.errors()[0]  # type: ignore[attr-defined]
        return f"{'.'.join(map(str, first.get('loc', ()))) or 'value'}: {first.get('msg', '')}"[:300]
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]
