"""One exception hierarchy for everything a user can get wrong.

The CLI turns any ``FleetError`` into one line on stderr and its ``exit_code``;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class FleetError(Exception):
    """Base of every error whose message a user can act on."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file: where, and why."""

    file: str
    path: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '(top level)'}: {self.reason}"


class ConfigError(FleetError):
    """queues.yaml is missing, unreadable or invalid; carries every problem found."""

    exit_code = 2
    #: A file that is wrong everywhere (a YAML list pasted in place of a mapping, a
    #: generated file) would bury the first, usually causal, problem in hundreds.
    SHOWN = 20

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """The first ``SHOWN`` problems, then how many more there are."""
        shown = [str(p) for p in self.problems[:self.SHOWN]]
        if len(self.problems) > self.SHOWN:
            shown.append(f"... and {len(self.problems) - self.SHOWN} more")
        return shown


class JobInputError(FleetError):
    """A batch job's input or parameters are wrong; nothing was enqueued."""

    exit_code = 2


class UnknownJobError(FleetError):
    """A job id that Redis does not know (expired, mistyped, other prefix)."""

    exit_code = 2


class BrokerUnavailableError(FleetError):
    """Redis did not answer at the configured URL."""

    exit_code = 3


class PayloadError(FleetError):
    """A claim-check payload could not be stored or fetched."""


class MemoryLimitExceeded(FleetError):
    """A task's pool process outgrew its queue's memory limit and was stopped mid-task.

    Raised (as a stored task result) by the memory guard, not by task code. Its message
    carries the task id, the RSS seen and the limit so the result alone explains it.
    """

    def __init__(self, message: str = "memory limit exceeded", *args: object):
        super().__init__(message, *args)


class SupervisionError(FleetError):
    """A supervisor (``fleet up``, ``fleet autoscale``) stopped because a part of it
    failed and could not be restarted."""


class WorkdirInUseError(SupervisionError):
    """Another supervisor runs on this workdir."""


class DeadLettered(FleetError):
    """A task's message went to its queue's dead-letter list instead of running again.

    Stored as the task's result (so it ends FAILED, never PENDING forever) and sent with
    Celery's task_failure signal (so a job's chunk fails visibly). The message names the
    task id, the deliveries and the reason; ``fleet dead show`` has the rest.
    """

    def __init__(self, message: str = "dead-lettered", *args: object):
        super().__init__(message, *args)


class WrongArguments(FleetError, TypeError):
    """A task was sent arguments its function cannot take (a producer of another version).

    Still a TypeError for code that catches one; the worker dead-letters the message so
    it can be re-sent once producer and worker agree again.
    """

    def __init__(self, message: str = "wrong arguments", *args: object):
        super().__init__(message, *args)


class UnknownDeadLetterError(FleetError):
    """A dead-letter id that no queue's list holds (requeued, purged, mistyped)."""

    exit_code = 2


class NotRequeueableError(FleetError):
    """A dead-letter entry that is not a task message (undecodable, no envelope)."""
