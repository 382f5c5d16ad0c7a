"""The config package's one error type, in a module of its own so that load.py and
validate.py both import it without importing each other."""


class ConfigError(ValueError):
    """A bad config. The message is one line: the key, the value and the fix."""
