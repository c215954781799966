"""The fleet's message builder: claim-check plus a publish timestamp.

Celery's task messages carry no time of publication, and a message waiting in a Redis
list says nothing of how long it has waited. Every fleet message gets a
``fleet-sent`` header (publisher clock, seconds since the epoch), so the autoscaler
can read the age of each queue's oldest waiting message from the list's tail: the
latency a data team feels, which depth alone does not tell.
"""

from __future__ import annotations

import time

from fleet.claimcheck import ClaimCheckAMQP

SENT_HEADER = "fleet-sent"


class FleetAMQP(ClaimCheckAMQP):
    def as_task_v2(self, *args, **kwargs):
        message = super().as_task_v2(*args, **kwargs)
        message.headers[SENT_HEADER] = round(time.time(), 3)
        return message
