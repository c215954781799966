"""The fleet's message builder: claim-check plus a publish timestamp.

Celery's task messages carry no time of publication, and a message waiting in a Redis
list says nothing of how long it has waited. Every fleet message gets a
``fleet-sent`` header (publisher clock, seconds since the epoch), so the autoscaler
can read the age of each queue's oldest waiting message from the list's tail: the
latency a data team feels, which depth alone does not tell.
"""

from __future__ import annotations

import time

from kombu import Connection

from fleet.claimcheck import ClaimCheckAMQP

SENT_HEADER = "fleet-sent"


class FleetConnection(Connection):
    """A kombu Connection whose URI keeps the ``redis://`` scheme.

    The fleet's transport is kombu's Redis transport plus guards (fleet.transport), named
    by its class path; kombu then writes URIs as ``fleet.transport:Transport://...``,
    and Flower (which picks its broker view from the scheme) said "'redis' broker is
    not supported" and showed no queue lengths. It is Redis on the wire, so say so."""

    def as_uri(self, include_password=False, mask="**", **kwargs) -> str:
        uri = super().as_uri(include_password, mask, **kwargs)
        scheme, sep, rest = uri.partition("://")
        if sep and scheme == "fleet.transport:Transport":
            return f"{'rediss' if self.ssl else 'redis'}://{rest}"
        return uri


class FleetAMQP(ClaimCheckAMQP):
    Connection = FleetConnection

    def as_task_v2(self, *args, **kwargs):
        message = super().as_task_v2(*args, **kwargs)
        message.headers[SENT_HEADER] = round(time.time(), 3)
        return message
