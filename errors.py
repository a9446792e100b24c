"""The one error type the CLI turns into a one-line message and exit code 1."""

_WORKER_PREFIX = "Caught SdmError in DataLoader worker"


class SdmError(ValueError):
    """A problem with the user's input (file, column, value, config).

    The message must name the file, column or value, fit on one line, and make
    sense without a traceback.

    A torch DataLoader worker re-raises an error in the main process as
    `SdmError("Caught SdmError in DataLoader worker process 0.\\nOriginal
    Traceback ...\\nsdm.errors.SdmError: <message>")`; such a message is cut
    back to the original one line.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith(_WORKER_PREFIX):
            last = args[0].rstrip().splitlines()[-1]
            args = (last.split("SdmError: ", 1)[-1],)
        super().__init__(*args)
