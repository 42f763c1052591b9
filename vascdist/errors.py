"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class VascdistError(Exception):
    """Bad input or an unrecoverable condition; the message names the thing at fault (file, row, key)."""


class ConfigError(VascdistError):
    """A config file or override is wrong; the message names the dotted key."""


class DataError(VascdistError):
    """A recording, manifest or shard is wrong; the message names the file (and row)."""
