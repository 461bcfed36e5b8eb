"""Serving an export: continuous batching over one runtime (:mod:`.scheduler`), an OpenAI-compatible HTTP server
(:mod:`.app`, needs the ``serve`` extra) and a Triton Inference Server model repository (:mod:`.triton_repo`)."""

from .scheduler import ChoiceSettings, Delta, Failed, Finished, Overloaded, Request, Scheduler, SchedulerStats
from .text import ChoiceText

__all__ = ["ChoiceSettings", "ChoiceText", "Delta", "Failed", "Finished", "Overloaded", "Request", "Scheduler",
           "SchedulerStats"]
