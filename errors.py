"""The one error type the CLI turns into a one-line message and exit code 1."""


class SdmError(ValueError):
    """A problem with the user's input (file, column, value, config).

    The message must name the file, column or value, fit on one line, and make
    sense without a traceback.
    """
