"""Error types shared by both packages; importing them loads no heavy dependency."""


class UserInputError(ValueError):
  """Bad input from the user; the message names the problem and the fix."""


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupted, or belongs to a different run."""


class TrainingDiverged(UserInputError):
  """The training loss or the model's predictions became NaN or infinite; the settings (usually the
  learning rate, or low precision) are at fault."""
