"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class EvomergeError(Exception):
    """Base class for every error caused by input (configs, recipes, checkpoints, flags)."""


class ConfigError(EvomergeError):
    """A recipe, config file or command-line value is invalid."""


class MethodError(ConfigError):
    """A merge method was asked for with parameters it cannot take."""


class CheckpointError(EvomergeError):
    """A model folder is unreadable, unsafe, or incompatible with the others."""


class EvaluationError(EvomergeError):
    """An evaluator is misconfigured (unknown task, missing data, unknown metric) or failed."""


class MergeError(EvomergeError):
    """A merge produced an unusable tensor (NaN or Inf) from valid inputs."""
