"""The exceptions the CLI turns into one line on stderr: the user's (exit code 2) and a
training run that went non-finite (exit code 3)."""


class UsageError(Exception):
  """A problem the user can fix: bad flag value, missing data, unknown name."""


class NonFiniteError(Exception):
  """Training produced a non-finite loss or gradient and stopped (`--on-nonfinite stop`)."""
