"""The one error type for bad arguments and inputs, and how its message is shown."""


class InputError(ValueError):
    """A bad argument or input (missing file, invalid value, unusable model folder, ...).

    The message names the file or option and what was expected; the command line prints it on one line and exits
    with status 2.
    """


def one_line(error: BaseException) -> str:
    """The message of `error` with all whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(error).split())
