"""The one exception type for errors a user can cause (bad files, fields, arguments)."""


class ChameleonError(ValueError):
    """Bad input: the message names the file, tensor, field or argument and what was expected."""
