"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UsageError(Exception):
  """A problem the user can fix: bad flag value, missing data, unknown name."""
