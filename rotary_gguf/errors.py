"""The one exception type that the CLI turns into a red one-line error and exit code 2."""


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line (no traceback)."""

    exit_code = 2
