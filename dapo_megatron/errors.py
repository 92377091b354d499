"""Errors shared by config validation and the run's resolution (config.py, resolve.py)."""


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent."""
