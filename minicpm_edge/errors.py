"""The one exception type that reaches users as a one-line message."""


class UserError(Exception):
    """Bad input or an unsupported request: the CLI prints the message alone and exits non-zero."""
