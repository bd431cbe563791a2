"""Recipe steps, registered under their YAML name. Each module: config fields + ``apply(ctx)``."""

from qtool.steps.registry import STEPS, StepConfig, StepError, parse_step, register, step_name

__all__ = ["STEPS", "StepConfig", "StepError", "parse_step", "register", "step_name"]
