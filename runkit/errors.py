"""Error types shared by both packages; importing them loads no heavy dependency."""


class UserInputError(ValueError):
  """Bad input from the user; the message names the problem and the fix."""


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupted, or belongs to a different run."""
