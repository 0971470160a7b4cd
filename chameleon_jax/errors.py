"""The one exception type for errors a user can cause (bad files, fields, arguments)."""


class ChameleonError(ValueError):
    """Bad input: the message names the file, tensor, field or argument and what was expected."""


def read_json(path, what: str) -> dict:
    """The JSON object in ``path`` (a config, marker or metadata file); a missing, unreadable or
    malformed file, or one holding something other than an object, raises ChameleonError naming
    ``path`` and ``what`` it is."""
    import json
    import os

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ChameleonError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise ChameleonError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChameleonError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ChameleonError(f"{path}: expected a JSON object in the {what}, got {type(d).__name__}")
    return d
