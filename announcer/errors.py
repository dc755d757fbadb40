"""Errors that cross module boundaries."""


class ConfigError(Exception):
    """Bad input: the CLI prints it on one line and exits with code 2."""
