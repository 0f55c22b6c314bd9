"""Errors that are the user's input, not a bug: one line naming the input and the fix.

Raised by the models, the task and the memory where a setting cannot work. They are ``ValueError``s;
under a fairseq command line (``--user-dir longmem``) an uncaught one ends the process with its message
alone, without a traceback (``longmem.compat``).
"""


class ConfigError(ValueError):
    pass


class CommandFailed(RuntimeError):
    """A program this one started (a stage of ``make demo``) failed; its own message is above."""
