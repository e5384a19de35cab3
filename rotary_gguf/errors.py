"""The exception types that the CLI turns into a red one-line error and exit code 2."""


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line (no traceback)."""

    exit_code = 2


class PromptError(UserError):
    """A prompt this model cannot take: empty, longer than the context, or refused by the chat template."""
