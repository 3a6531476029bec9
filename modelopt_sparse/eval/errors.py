"""The one exception the eval job raises for a problem the user can fix."""


class EvalError(Exception):
    """A bad option, a missing model or file, an unusable model: the message says what to do.

    The command line prints the message alone (no traceback) and exits with status 2.
    """
