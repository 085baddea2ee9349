"""Every private attribute of Lightning the package reads, in one place (a Lightning upgrade reviews this file)."""

from __future__ import annotations

from typing import Any

__all__ = ["is_logging_step"]


def is_logging_step(trainer: Any) -> bool:
    """Whether ``self.log`` values of this training step reach the loggers (``log_every_n_steps``).

    Private, because Lightning has no public view of its own "log on this step" rule: it lives only in the
    logger connector. Callers use it to skip work (a reduction) whose value would not be logged.
    """
    return bool(trainer._logger_connector.should_update_logs)
