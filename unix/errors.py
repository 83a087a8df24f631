"""Errors that mean "the user gave us something wrong": the CLI prints them as one line, no traceback."""


class UserError(Exception):
    """Bad input (file, field, option, weights folder). The message names what is wrong."""
