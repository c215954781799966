"""kombu's Redis transport, with one failure mode of a lost connection fixed.

When the connection to Redis drops, kombu collects the transport: the old channel's
``connection.client`` becomes None. Anything that still touches that channel (Celery
acking a task that finished during the outage, or closing the channel, which restores
its unacked messages) then fails with ``AttributeError: 'NoneType' object has no
attribute 'hostname'``. That is not a connection error, so Celery does not ignore it:
the worker dies with "Unrecoverable error" when Redis merely restarted.

Here the dead channel raises redis's ConnectionError instead, which Celery handles as
intended ("Couldn't ack", reconnect). The message stays in Redis's ``unacked`` hash and
comes back after ``visibility_timeout`` (see fleet.lease), so nothing is lost.
"""

from __future__ import annotations

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous=False):
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError(
                "the broker connection of this channel was lost and collected")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel
