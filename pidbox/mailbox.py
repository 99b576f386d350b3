"""The process mailbox: names, queues, and the client side of remote control."""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager
from copy import copy
from time import monotonic, time
from uuid import NAMESPACE_OID, uuid3, uuid5

from kombu import Exchange
from kombu.clocks import LamportClock
from kombu.common import get_node_id, maybe_declare
from kombu.exceptions import InconsistencyError
from kombu.serialization import prepare_accept_content
from kombu.transport.virtual import Channel as VirtualChannel
from kombu.utils.functional import maybe_evaluate
from kombu.utils.objects import cached_property
from kombu.utils.uuid import uuid

import pidbox as _api  # Producer/Consumer/Queue are looked up here: patchable

from .exceptions import ROUTE_HEADER
from .node import Node
from .replies import ReplyRouter, Unclaimed

__all__ = ('Mailbox', 'REPLY_QUEUE_EXPIRES')

logger = logging.getLogger(__name__)

REPLY_QUEUE_EXPIRES = 10

#: How a request with a timeout retries its publish while the broker is
#: away: a few quick tries (about a second), then the error, so that a call
#: or cast does not block forever (kombu's default) past its deadline.
PUBLISH_RETRY_POLICY = {'max_retries': 3, 'interval_start': 0,
                        'interval_step': 0.2, 'interval_max': 1}

#: When the current thread's _broadcast began (its call's deadline origin).
_call_started = threading.local()


def channel_is_gone(channel) -> bool:
    """True when ``channel`` was closed or torn down with its connection.

    py-amqp's channel says so with ``is_open`` and, once collected, loses its
    ``connection``; kombu's virtual channels never lose theirs.
    """
    return (getattr(channel, 'is_open', True) is False or
            getattr(channel, 'connection', True) is None)


class Mailbox:
    """Process mailbox: broadcast commands to nodes and collect replies.

    A drop-in for :class:`kombu.pidbox.Mailbox` (same constructor, attributes
    and methods, same wire format), with a total deadline for ``timeout``,
    ``limit`` counting matching replies, a bounded :attr:`unclaimed`, and
    routing headers that let pidbox nodes skip requests for other nodes
    without decoding them.
    """

    node_cls = Node
    exchange_fmt = '%s.pidbox'
    reply_exchange_fmt = 'reply.%s.pidbox'

    #: Name of application.
    namespace = None

    #: Connection (if bound).
    connection = None

    #: Exchange type (usually direct, or fanout for broadcast).
    type = 'direct'

    #: mailbox exchange (init by constructor).
    exchange = None

    #: exchange to send replies to.
    reply_exchange = None

    #: Only accepts json messages by default.
    accept = ['json']

    #: Message serializer
    serializer = None

    def __init__(self, namespace,
                 type='direct', connection=None, clock=None,
                 accept=None, serializer=None, producer_pool=None,
                 queue_ttl=None, queue_expires=None,
                 queue_durable=None, queue_exclusive=None,
                 reply_queue_ttl=None, reply_queue_expires=10.0,
                 durable=None, exclusive=None):
        queue_durable = _alias('queue_durable', queue_durable,
                               'durable', durable, False)
        queue_exclusive = _alias('queue_exclusive', queue_exclusive,
                                 'exclusive', exclusive, True)
        self.namespace = namespace
        self.connection = connection
        self.type = type
        self.clock = LamportClock() if clock is None else clock
        self.exchange = self._get_exchange(self.namespace, self.type)
        self.reply_exchange = self._get_reply_exchange(self.namespace)
        self.unclaimed = Unclaimed()
        self.accept = self.accept if accept is None else accept
        self.serializer = self.serializer if serializer is None else serializer
        self.queue_ttl = queue_ttl
        self.queue_expires = queue_expires
        self.queue_durable = queue_durable
        self.queue_exclusive = queue_exclusive
        self.reply_queue_ttl = reply_queue_ttl
        self.reply_queue_expires = reply_queue_expires
        self._producer_pool = producer_pool
        #: the mailbox that bound copies were made from (shared state).
        self._root = self
        self._reply_routers = {}
        if queue_exclusive and queue_durable:
            raise ValueError(
                'queue_exclusive and queue_durable cannot both be True '
                '(exclusive queues are automatically deleted and cannot be '
                'durable).',
            )

    def __call__(self, connection):
        bound = copy(self)
        bound.connection = connection
        # a reply queue cached on the original is named for its connection
        bound.__dict__.pop('reply_queue', None)
        return bound

    def Node(self, hostname=None, state=None, channel=None, handlers=None):
        hostname = hostname or socket.gethostname()
        return self.node_cls(hostname, state, channel, handlers, mailbox=self)

    def call(self, destination, command, kwargs=None,
             timeout=None, callback=None, channel=None):
        kwargs = {} if not kwargs else kwargs
        return self._broadcast(command, kwargs, destination,
                               reply=True, timeout=timeout,
                               callback=callback,
                               channel=channel)

    def cast(self, destination, command, kwargs=None):
        kwargs = {} if not kwargs else kwargs
        return self._broadcast(command, kwargs, destination, reply=False)

    def abcast(self, command, kwargs=None):
        kwargs = {} if not kwargs else kwargs
        return self._broadcast(command, kwargs, reply=False)

    def multi_call(self, command, kwargs=None, timeout=1,
                   limit=None, callback=None, channel=None):
        kwargs = {} if not kwargs else kwargs
        return self._broadcast(command, kwargs, reply=True,
                               timeout=timeout, limit=limit,
                               callback=callback,
                               channel=channel)

    def get_reply_queue(self):
        oid = self.oid
        return _api.Queue(
            f'{oid}.{self.reply_exchange.name}',
            exchange=self.reply_exchange,
            routing_key=oid,
            durable=self.queue_durable,
            exclusive=self.queue_exclusive,
            auto_delete=not self.queue_durable,
            expires=self.reply_queue_expires,
            message_ttl=self.reply_queue_ttl,
        )

    @cached_property
    def reply_queue(self):
        return self.get_reply_queue()

    def get_queue(self, hostname):
        return _api.Queue(
            f'{hostname}.{self.namespace}.pidbox',
            exchange=self.exchange,
            durable=self.queue_durable,
            exclusive=self.queue_exclusive,
            auto_delete=not self.queue_durable,
            expires=self.queue_expires,
            message_ttl=self.queue_ttl,
        )

    @contextmanager
    def producer_or_acquire(self, producer=None, channel=None):
        if producer:
            yield producer
        elif self.producer_pool:
            with self.producer_pool.acquire() as producer:
                yield producer
        else:
            yield _api.Producer(channel, auto_declare=False)

    def _publish_reply(self, reply, exchange, routing_key, ticket,
                       channel=None, producer=None, **opts):
        chan = channel or self.connection.default_channel
        if producer is None and channel_is_gone(chan):
            # The broker closed the connection while the request was being
            # handled (py-amqp still hands over deliveries it had read): a
            # connection error, so the consumer loop reconnects, instead of
            # an AttributeError from deep inside py-amqp.
            raise ConnectionError(
                f'pidbox: cannot send the reply for ticket {ticket} to '
                f'{exchange}/{routing_key}: the channel is closed')
        exchange = Exchange(exchange, exchange_type='direct',
                            delivery_mode='transient',
                            durable=False)
        with self.producer_or_acquire(producer, chan) as producer:
            expiring = self._expire_reply_queue(producer.channel, exchange,
                                                routing_key)
            try:
                producer.publish(
                    reply, exchange=exchange, routing_key=routing_key,
                    declare=[exchange], headers={
                        'ticket': ticket, 'clock': self.clock.forward(),
                    }, retry=True,
                    **opts
                )
            except InconsistencyError:
                # the reply queue is gone: nobody is waiting for this reply.
                pass
            finally:
                if expiring is not None:
                    expiring[0].pop(expiring[1], None)

    def _expire_reply_queue(self, channel, exchange, routing_key):
        """Make a reply that outlives its caller expire on Redis.

        kombu's Redis channel sets a queue's x-expires on each push only if
        that channel declared the queue, and a node's never does: a late
        reply would create a reply queue that never expires.  For this one
        publish the node's channel learns the caller's expiry.
        """
        expires = getattr(channel, '_expires', None)
        if not (isinstance(expires, dict) and self.reply_queue_expires):
            return None
        queue = f'{routing_key}.{exchange.name}'
        if queue in expires:
            return None
        expires[queue] = int(self.reply_queue_expires * 1000)
        return expires, queue

    def _publish(self, type, arguments, destination=None,
                 reply_ticket=None, channel=None, timeout=None,
                 serializer=None, producer=None, pattern=None, matcher=None):
        message = {'method': type,
                   'arguments': arguments,
                   'destination': destination,
                   'pattern': pattern,
                   'matcher': matcher}
        chan = channel or self.connection.default_channel
        exchange = self.exchange
        if reply_ticket:
            maybe_declare(self.reply_queue(chan))
            message.update(ticket=reply_ticket,
                           reply_to={'exchange': self.reply_exchange.name,
                                     'routing_key': self.oid})
        serializer = serializer or self.serializer
        with self.producer_or_acquire(producer, chan) as producer:
            producer.publish(
                message, exchange=exchange.name, declare=[exchange],
                headers={'clock': self.clock.forward(),
                         'expires': time() + timeout if timeout else 0,
                         ROUTE_HEADER: [list(destination or ()),
                                        pattern or '', matcher or '']},
                serializer=serializer, retry=True,
                retry_policy=PUBLISH_RETRY_POLICY if timeout else None,
            )

    def _broadcast(self, command, arguments=None, destination=None,
                   reply=False, timeout=1, limit=None,
                   callback=None, channel=None, serializer=None,
                   pattern=None, matcher=None):
        if destination is not None and \
                not isinstance(destination, (list, tuple)):
            raise ValueError(
                'destination must be a list/tuple not {}'.format(
                    type(destination)))
        if (pattern is not None and not isinstance(pattern, str) and
                matcher is not None and not isinstance(matcher, str)):
            raise ValueError(
                'pattern and matcher must be '
                'strings not {}, {}'.format(type(pattern), type(matcher))
            )

        arguments = arguments or {}
        reply_ticket = reply and uuid() or None
        chan = channel or self.connection.default_channel

        # Set reply limit to number of destinations (if specified)
        if limit is None and destination:
            limit = destination and len(destination) or None

        serializer = serializer or self.serializer
        _call_started.value = monotonic()  # the deadline counts the publish
        try:
            self._publish(command, arguments, destination=destination,
                          reply_ticket=reply_ticket,
                          channel=chan,
                          timeout=timeout,
                          serializer=serializer,
                          pattern=pattern,
                          matcher=matcher)

            if reply_ticket:
                return self._collect(reply_ticket, limit=limit,
                                     timeout=timeout,
                                     callback=callback,
                                     channel=chan)
        finally:
            _call_started.value = None

    def _collect(self, ticket,
                 limit=None, timeout=1, callback=None,
                 channel=None, accept=None):
        """Collect the replies for ``ticket``.

        Returns once ``limit`` replies for this ticket arrived, or when
        ``timeout`` seconds have passed since the call began (a total
        deadline, not an idle gap); ``timeout=None`` waits without end.
        Replies for other tickets are kept in :attr:`unclaimed`.
        """
        if accept is None:
            accept = self.accept
        started = getattr(_call_started, 'value', None) or monotonic()
        deadline = None if timeout is None else started + timeout
        chan = channel or self.connection.default_channel
        responses = []
        for body in self.unclaimed.pop(ticket, ()):
            if callback:
                callback(body)
            responses.append(body)
        if limit is not None and len(responses) >= limit:
            return responses

        keep = not isinstance(chan, VirtualChannel)
        router = self._reply_router(chan, keep)
        collected = router.expect(ticket, prepare_accept_content(accept),
                                  callback)
        collected.extend(responses)
        drain_events = self.connection.drain_events
        try:
            if router.consumer is None:
                router.consumer = self._reply_consumer(chan, router, keep)
            while limit is None or len(collected) < limit:
                if deadline is None:
                    remaining = None
                else:
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        break
                try:
                    drain_events(timeout=remaining)
                except socket.timeout:
                    break
            return collected
        finally:
            router.done()
            if not keep:
                self._close_reply_consumer(chan, router)

    def _reply_router(self, chan, keep):
        """The reply router for ``chan``: kept across calls when ``keep``."""
        if not keep:
            return ReplyRouter(self.unclaimed, self.clock)
        routers = self._reply_routers
        key = (id(chan), self.oid)
        router = routers.get(key)
        if router is None or router.channel is not chan:
            for stale in [k for k, r in routers.items()
                          if channel_is_gone(r.channel)]:
                del routers[stale]
            router = routers[key] = ReplyRouter(self.unclaimed, self.clock)
            router.channel = chan
        return router

    def _reply_consumer(self, chan, router, declare):
        # On virtual transports _publish declared the queue a moment ago
        # and declaring costs a round trip (Redis): consume without it.
        consumer = _api.Consumer(chan, [self.reply_queue], no_ack=True,
                                 accept=None, on_message=router.on_message,
                                 auto_declare=declare)
        consumer.consume()
        return consumer

    def _close_reply_consumer(self, chan, router):
        consumer, router.consumer = router.consumer, None
        try:
            if consumer is not None:
                consumer.cancel()
        finally:
            chan.after_reply_message_received(self.reply_queue.name)

    def _get_exchange(self, namespace, type):
        return Exchange(self.exchange_fmt % namespace,
                        type=type,
                        durable=False,
                        delivery_mode='transient')

    def _get_reply_exchange(self, namespace):
        return Exchange(self.reply_exchange_fmt % namespace,
                        type='direct',
                        durable=False,
                        delivery_mode='transient')

    @property
    def oid(self):
        """Routing key of this caller's reply queue.

        Distinct per process, thread, mailbox and connection, like kombu's;
        unlike kombu's, the bound copies of one mailbox on one connection
        share it, so Celery's copy-per-broadcast reuses one reply queue (and
        one open reply consumer) instead of leaving one behind per call.
        """
        return _oid(self._root, self.connection)

    @cached_property
    def producer_pool(self):
        return maybe_evaluate(self._producer_pool)


def _oid(root, connection):
    entity = '{:x}-{:x}-{:x}-{:x}-{:x}'.format(
        get_node_id(), os.getpid(), threading.get_ident(), id(root),
        id(connection))
    try:
        return str(uuid3(NAMESPACE_OID, entity))
    except ValueError:  # md5 disabled (FIPS)
        return str(uuid5(NAMESPACE_OID, entity))


def _alias(name, value, alias, alias_value, default):
    """Reconcile kombu 5.7's keyword with its 5.6 documentation alias."""
    if alias_value is None:
        return default if value is None else value
    if value is not None and bool(value) != bool(alias_value):
        raise ValueError(f'{name}={value!r} contradicts {alias}='
                         f'{alias_value!r}: give one of them')
    return alias_value
