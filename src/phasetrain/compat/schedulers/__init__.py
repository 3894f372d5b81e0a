"""pytorch-accelerated's parameter schedulers (``pytorch_accelerated.schedulers``), for code ported to phasetrain."""
from phasetrain.compat.schedulers.cosine_scheduler import CosineLrScheduler
from phasetrain.compat.schedulers.scheduler_base import SchedulerBase, StatefulSchedulerBase

__all__ = ["CosineLrScheduler", "SchedulerBase", "StatefulSchedulerBase"]
