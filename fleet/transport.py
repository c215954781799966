"""kombu's Redis transport, with three failure modes fixed.

**A lost connection.** When the connection to Redis drops, kombu collects the transport:
the old channel's ``connection.client`` becomes None. Anything that still touches that
channel (Celery acking a task that finished during the outage, or closing the channel,
which restores its unacked messages) then fails with ``AttributeError: 'NoneType' object
has no attribute 'hostname'``. That is not a connection error, so Celery does not ignore
it: the worker dies with "Unrecoverable error" when Redis merely restarted. Here the dead
channel raises redis's ConnectionError instead, which Celery handles as intended
("Couldn't ack", reconnect). The message stays in Redis's ``unacked`` hash and comes back
after ``visibility_timeout`` (see fleet.lease), so nothing is lost.

**A malformed message.** kombu decodes what it pops (``_brpop_read``, ``_get``:
``loads(bytes_to_str(item))``) and builds a Message from it before Celery sees anything.
Bytes that are not JSON raise out of the event loop and stop the worker ("Unrecoverable
error"), the message gone; JSON without ``properties``, ``delivery_tag`` or
``delivery_info``, or with a body its ``body_encoding`` cannot decode, raises a KeyError or
TypeError that resets the consumer, which restores every message it holds (a running
acks_late task then runs twice). Here each of them goes to its queue's dead-letter list
(fleet.deadletter) and the worker goes on. ``_brpop_read`` and ``_get`` are kombu 5.7's
own with the decode step guarded (tests/integration/test_deadletter.py notices when kombu's change).

**Giving messages back is not a delivery.** kombu marks every message it restores as
``redelivered``, including the ones a worker gives back when its channel closes (a warm
shutdown's prefetched, never started messages; a consumer cancelled mid-read). fleet
counts redelivered messages to bound poison tasks (fleet.deliveries), so those are given
back unmarked here: they ran nowhere.
"""

from __future__ import annotations

import binascii
import logging
import socket

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from fleet.deadletter import MALFORMED, DeadLetterList, Reason, new_entry
from fleet.keys import dead_letter_prefix_for

logger = logging.getLogger("fleet.deadletter")

#: The transport option naming the dead-letter lists' key base (set by fleet.factory).
DEAD_LETTER_OPTION = "fleet_dead_letters"


class MalformedMessage(Exception):
    """What kombu popped cannot be a Message; ``detail`` says why. Caught in this module."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def envelope_problem(payload, codecs) -> str:
    """Why ``payload`` is not a kombu envelope this channel can deliver (the error path)."""
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__}, not a kombu envelope (an object)"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "a kombu envelope needs 'properties' (an object); this has none"
    if "delivery_tag" not in properties:
        return "its properties have no 'delivery_tag'"
    if not isinstance(properties["delivery_tag"], str):
        return "its delivery_tag is not a string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict):
        return "its properties have no 'delivery_info' (an object)"
    missing = [k for k in ("exchange", "routing_key") if k not in info]
    if missing:
        return f"its delivery_info has no {' or '.join(repr(k) for k in missing)}"
    encoding = properties.get("body_encoding")
    if encoding is not None and not isinstance(encoding, str):
        return f"its body_encoding is not a string: {encoding!r}"
    if encoding and encoding.lower() != "utf-8":
        if encoding not in codecs:
            return f"unknown body_encoding {encoding!r}"
        try:
            codecs[encoding].decode(payload.get("body"))
        except (binascii.Error, ValueError, TypeError) as exc:
            return f"its body is not valid {encoding}: {exc}"
    return "kombu cannot read this envelope"


class Message(virtual.Message):
    def __init__(self, payload, channel=None, **kwargs):
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedMessage(f"{_explain(payload, channel)} "
                                   f"({type(exc).__name__}: {exc})") from None
        info = self.delivery_info
        if (not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info
                or not isinstance(self.delivery_tag, str)):
            # kombu's QoS.append reads these (the tag becomes a Redis key); an error
            # there would reset the consumer.
            raise MalformedMessage(_explain(payload, channel))


def _explain(payload, channel) -> str:
    try:
        return envelope_problem(payload, getattr(channel, "codecs", {}))
    except Exception:  # whatever it is, it must not stop the worker either
        return "kombu cannot read this envelope"


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client=None):
        """At channel close: give every held message back, not marked redelivered."""
        with self.channel.conn_or_acquire(client) as client:
            for tag in self._delivered:
                self.give_back(tag, client=client)
        self._delivered.clear()

    def give_back(self, tag, client=None, leftmost=False):
        """kombu's ``restore_by_tag``, restoring the message as never delivered."""

        def restore_transaction(pipe):
            p = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if p:
                M, EX, RK = loads(bytes_to_str(p))
                self.channel._do_restore_message(M, EX, RK, pipe, leftmost, redelivered=False)

        with self.channel.conn_or_acquire(client) as client:
            client.transaction(restore_transaction, self.unacked_key)

    def reject_unmarked(self, delivery_tag):
        """``reject(requeue=True)`` for a message that never ran."""
        self.give_back(delivery_tag, leftmost=True)
        virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    Message = Message
    from_transport_options = (*kombu_redis.Channel.from_transport_options, DEAD_LETTER_OPTION)
    #: Key base of the dead-letter lists (fleet.deadletter.base_key); None: computed
    #: from the global key prefix, as fleet.keys names it.
    fleet_dead_letters: str | None = None
    _dead: DeadLetterList | None = None

    def _connparams(self, asynchronous=False):
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError(
                "the broker connection of this channel was lost and collected")
        return super()._connparams(asynchronous=asynchronous)

    # -- malformed messages --------------------------------------------------------------

    def keep_malformed(self, queue: str, payload, detail: str) -> None:
        """Put what was popped from ``queue`` (bytes, or decoded JSON) into its dead-letter
        list. If Redis is gone too, the message is logged in full: it left the list."""
        raw = payload if isinstance(payload, bytes | str) else None
        entry = new_entry(queue, Reason(MALFORMED, detail),
                          message=None if raw is not None else payload, raw=raw,
                          worker=socket.gethostname())
        try:
            self._dead_letters().add(entry)
        except self.connection_errors:
            logger.critical("could not dead-letter a malformed message of %r (%s): %r",
                            queue, detail, payload)
            raise
        logger.error("malformed message on %r dead-lettered as %s: %s", queue, entry.id,
                     detail)

    def _dead_letters(self) -> DeadLetterList:
        if self._dead is None:
            base = self.fleet_dead_letters or dead_letter_prefix_for(self.global_keyprefix or "")
            # A client of our own on the channel's pool: kombu's prefixing client would
            # prefix LPUSH but not LTRIM.
            self._dead = DeadLetterList(redis.Redis(connection_pool=self.pool), base)
        return self._dead

    def _decode(self, item, queue: str):
        try:
            return loads(bytes_to_str(item))
        except ValueError as exc:  # json.JSONDecodeError
            self.keep_malformed(queue, item, f"not JSON: {exc}")
            return None

    def _brpop_read(self, **options):
        # kombu 5.7's Channel._brpop_read, the decode step guarded (self._decode).
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection,
                                                        'BRPOP',
                                                        **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next
                # iteration will reconnect automatically.
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                payload = self._decode(item, dest)
                if payload is not None:
                    self.connection._deliver(payload, dest)
                return True
            else:
                raise kombu_redis.Empty()
        finally:
            self._in_poll = None
            # The BRPOP connection is now idle (its reply has been fully
            # consumed and no new BRPOP has been issued yet): this is the
            # safe moment to flush any pending streaming re-auth token.
            self._flush_brpop_reauth()

    def _get(self, queue):
        # kombu 5.7's Channel._get, the decode step guarded (self._decode).
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    payload = self._decode(item, queue)
                    if payload is None:
                        raise kombu_redis.Empty()
                    return payload

            self._maybe_update_queues_expire(client, queue)
            raise kombu_redis.Empty()

    # -- giving back ---------------------------------------------------------------------

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False,
                            redelivered=True):
        if redelivered:
            return super()._do_restore_message(payload, exchange, routing_key, pipe,
                                               leftmost)
        # kombu's _do_restore_message, clearing the redelivered marks instead of setting.
        try:
            for part in (payload.get("headers"),
                         (payload.get("properties") or {}).get("delivery_info")):
                if isinstance(part, dict):
                    part.pop("redelivered", None)
            for queue in self._lookup(exchange, routing_key):
                pri = self._get_message_priority(payload, reverse=False)
                (pipe.lpush if leftmost else pipe.rpush)(
                    self._q_for_pri(queue, pri), dumps(payload))
        except self.connection_errors:
            raise
        except Exception:
            logger.critical("Could not restore message: %r", payload, exc_info=True)


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message, queue):
        try:
            return super()._deliver(message, queue)
        except MalformedMessage as exc:
            # Raised building the Message, before anything was acked, held or run.
            channel = next((c for c in self.channels if c), None)
            if channel is None:
                logger.critical("malformed message on %r, no channel to keep it: %s: %r",
                                queue, exc.detail, message)
                return None
            channel.keep_malformed(queue, message, exc.detail)
            return None

    def _reject_inbound_message(self, raw_message):
        # A message that arrived after its consumer was cancelled: kombu rejects it with
        # requeue, which marks it redelivered; it was never run, so give it back unmarked.
        for channel in self.channels:
            if channel:
                message = channel.Message(raw_message, channel=channel)
                channel.qos.append(message, message.delivery_tag)
                channel.qos.reject_unmarked(message.delivery_tag)
                break
