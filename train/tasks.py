"""Which task a config describes: the one module that knows every task.

`train/task.py` defines what a task supplies to the loop; `train/image_task.py`
(`python -m train.cifar`) and `train/lm/harness.py` (`python -m train.lm`) implement it;
the loop and the comparison sweep pick one here, by the config's class. The choice sits
above the interface so that the interface never imports what implements it.
"""

from __future__ import annotations

from typing import Any

from train.config import Config
from train.image_task import ImageTask
from train.lm.config import LMConfig
from train.lm.harness import LMTask
from train.task import Task

# Most specific first: LMConfig extends Config.
TASKS: tuple[tuple[type, type], ...] = ((LMConfig, LMTask), (Config, ImageTask))


def for_config(cfg: Config, data: Any = None) -> Task:
  """The task `cfg` describes; `data` is its loaded dataset or corpus, loaded here when
  None."""
  for config_cls, task_cls in TASKS:
    if isinstance(cfg, config_cls):
      return task_cls(cfg, data)
  raise TypeError(f"no task for a {type(cfg).__name__}")
