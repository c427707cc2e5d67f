"""The training core's errors, a module of their own so that flags, checkpoints, data, tasks and
the loop can all raise them without importing one another."""


class UsageError(ValueError):
    """Bad input found before training; the message says what to change."""


class TrainingDiverged(RuntimeError):
    """The training loss or the weights became non-finite; the message names the step."""
