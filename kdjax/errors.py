"""The one error type for bad input.

kdjax raises :class:`ConfigError` for anything a user can fix — a config
field, a flag, a file, an argument of a public function — with a one-line
message that names the bad value and the fix. The command line prints that
line and exits 1; any other exception is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
  """Bad input: the message names the field, file or argument and how to fix it."""
