"""placeholder"""
from typing import Any

from pipelines.experiments.common import ExperimentSettings

NAME = "upsample-guidance"
CLAIM = "(not yet)"
class Settings(ExperimentSettings):
    pass
PRESETS: dict[str, dict[str, Any]] = {"small": {}}
def run(s, out, log=print):
    raise NotImplementedError
