"""The mailbox node: the process end that receives commands and replies."""

from __future__ import annotations

import logging
import warnings
from time import time

from kombu.exceptions import (
    DecodeError, EncodeError, InconsistencyError,
)
from kombu.serialization import prepare_accept_content
from kombu.transport.virtual import Channel as VirtualChannel
from kombu.utils.functional import reprcall

import pidbox as _api  # Consumer is looked up here so patching pidbox.Consumer works

from . import _core
from ._codec import error_reply
from .exceptions import MalformedRequest

__all__ = ('Node', 'W_PIDBOX_IN_USE')

logger = logging.getLogger(__name__)

W_PIDBOX_IN_USE = """\
A node named {node.hostname} is already using this process mailbox!

Maybe you forgot to shutdown the other node or did not do so properly?
Or if you meant to start multiple nodes on the same host please make sure
you give each node a unique node name!
"""

_DISPATCH_METHODS = ('dispatch', 'handle', 'handle_call', 'handle_cast')


def _as_clock(value):
    """The Lamport clock a header carries, or 0 when it carries none."""
    if type(value) is int:
        return value
    if value:
        logger.debug('pidbox: ignoring clock header %r: not an integer', value)
    return 0


class Node:
    """Mailbox node: consumes commands for ``hostname`` and runs handlers."""

    #: hostname of the node.
    hostname = None

    #: the :class:`~pidbox.Mailbox` this is a node for.
    mailbox = None

    #: map of method name/handlers.
    handlers = None

    #: current context (passed on to handlers)
    state = None

    #: current channel.
    channel = None

    #: the dispatch core module (compiled or pure) this node decides with.
    dispatch_core = _core.core

    #: seconds a call (a request wanting a reply) may be past its
    #: ``expires`` header and still run: 0, its caller has stopped listening.
    expiry_grace = 0.0

    #: the same for a cast.  Clients stamp casts with ``expires`` too (Celery
    #: with its default 1 s timeout), but nobody waits for them: a revoke
    #: held up behind a slow handler must still run.  Casts older than this
    #: (left in a durable queue while the node was down) are dropped.
    cast_expiry_grace = 60.0

    def __init__(self, hostname, state=None, channel=None,
                 handlers=None, mailbox=None):
        self.channel = channel
        self.mailbox = mailbox
        self.hostname = hostname
        self.state = state
        self.adjust_clock = self.mailbox.clock.adjust
        if handlers is None:
            handlers = {}
        self.handlers = handlers
        self._dispatcher = None
        self._raw_handler = None

    def Consumer(self, channel=None, no_ack=True, accept=None, **options):
        queue = self.mailbox.get_queue(self.hostname)

        def verify_exclusive(name, messages, consumers):
            if consumers:
                warnings.warn(W_PIDBOX_IN_USE.format(node=self))
        queue.on_declared = verify_exclusive

        channel = channel or self.channel
        conn = self.mailbox.connection
        if conn is None:  # an unbound mailbox, as Celery builds its nodes
            conn = getattr(getattr(channel, 'connection', None), 'client',
                           None)
        channel_errors = conn.channel_errors if conn else ()
        try:
            return _api.Consumer(
                channel, [queue], no_ack=no_ack,
                accept=self.mailbox.accept if accept is None else accept,
                **options
            )
        except channel_errors as exc:
            if getattr(exc, 'code', 0) == 405:
                raise InconsistencyError(
                    W_PIDBOX_IN_USE.format(node=self)
                ) from exc
            raise

    def handler(self, fun):
        self.handlers[fun.__name__] = fun
        return fun

    def on_decode_error(self, message, exc):
        logger.error('Cannot decode message: %r', exc, exc_info=1)

    def listen(self, channel=None, callback=None):
        """Start consuming the node queue.

        Without ``callback`` the node reads raw messages itself and decides
        with the dispatch core before anything is decoded; the consumer still
        names :meth:`handle_message` in its callbacks, as kombu's does.  With
        ``callback`` (Celery's way) kombu decodes each message and the
        callback is expected to call :meth:`handle_message`.
        """
        consumer = self.Consumer(channel=channel,
                                 callbacks=[callback or self.handle_message],
                                 on_decode_error=self.on_decode_error)
        if callback is None and 'handle_message' not in self.__dict__ and \
                type(self).handle_message is Node.handle_message:
            dispatcher = self.dispatch_core.Dispatcher(
                self.hostname, consumer.accept)
            consumer.on_message = self.dispatch_core.RawHandler(
                self, dispatcher, consumer)
            consumer.consume()
            self._filter_payloads(consumer)
            return consumer
        consumer.consume()
        return consumer

    def _filter_payloads(self, consumer):
        """On kombu's virtual transports, drop requests for other nodes
        before the transport builds a Message and decodes the body.

        A virtual channel's ``basic_consume`` registers its delivery callback
        in the transport's ``_callbacks`` by queue name; the node puts its
        :class:`PayloadFilter` in front of it (for ``no_ack`` consumers: a
        dropped payload needs no acknowledgement).  The message for another
        node is gone after its headers were read, as on the other paths.
        """
        channel = consumer.channel
        if not (consumer.no_ack and isinstance(channel, VirtualChannel)):
            return
        callbacks = getattr(channel.connection, '_callbacks', None)
        if not isinstance(callbacks, dict):
            return
        for queue in consumer.queues:
            deliver = callbacks.get(queue.name)
            if callable(deliver) and not isinstance(
                    deliver, self.dispatch_core.PayloadFilter):
                callbacks[queue.name] = self.dispatch_core.PayloadFilter(
                    consumer.on_message, deliver)

    def dispatch(self, method, arguments=None,
                 reply_to=None, ticket=None, **kwargs):
        arguments = arguments or {}
        if logger.isEnabledFor(logging.DEBUG):
            self._log_received(method, arguments, reply_to, ticket)
        handle = reply_to and self.handle_call or self.handle_cast
        try:
            reply = handle(method, arguments)
        except SystemExit:
            raise
        except Exception as exc:
            logger.error('pidbox command error: %r', exc, exc_info=1)
            reply = error_reply(exc)

        if reply_to:
            self._send_reply(reply, reply_to, ticket)
        return reply

    def handle(self, method, arguments=None):
        arguments = {} if not arguments else arguments
        return self.handlers[method](self.state, **arguments)

    def handle_call(self, method, arguments):
        return self.handle(method, arguments)

    def handle_cast(self, method, arguments):
        return self.handle(method, arguments)

    def get_dispatcher(self):
        """The dispatch core's decision maker for this node (cached)."""
        dispatcher = self._dispatcher
        if dispatcher is None or dispatcher.hostname != self.hostname or \
                type(dispatcher) is not self.dispatch_core.Dispatcher:
            dispatcher = self._dispatcher = self.dispatch_core.Dispatcher(
                self.hostname, prepare_accept_content(self.mailbox.accept))
        return dispatcher

    def handle_message(self, body, message=None):
        """Run a decoded request if it is for this node; return the reply.

        A malformed request is logged with what was wrong and ignored: it
        never raises into the consumer that delivered it.
        """
        if message:
            self.adjust_clock(_as_clock(message.headers.get('clock')))
        try:
            request = self.get_dispatcher().route(body)
        except DecodeError as exc:
            logger.error('pidbox: rejected request: %s', exc)
            return None
        if request is None or (message and self._expired(
                message.headers, request.get('reply_to'))):
            return None
        return self._run(request)
    dispatch_from_message = handle_message

    def handle_raw_message(self, message):
        """Decide on and run one raw :class:`kombu.Message` (no decode first).

        Undecodable bodies, refused content types and malformed requests go
        to :meth:`on_decode_error`; nothing raises out.
        """
        handler = self._raw_handler
        dispatcher = self.get_dispatcher()
        if handler is None or handler.dispatcher is not dispatcher:
            handler = self._raw_handler = self.dispatch_core.RawHandler(
                self, dispatcher)
        return handler(message)

    def _expired(self, headers, reply_to=None) -> bool:
        expires = headers.get('expires') if headers else None
        if not expires:
            return False
        grace = self.expiry_grace if reply_to else self.cast_expiry_grace
        try:
            expired = time() > expires + grace
        except TypeError:
            logger.error('pidbox: rejected request: %s', MalformedRequest(
                'expires', f'expected a number, got {type(expires).__name__}'))
            return True
        if expired:
            logger.debug('pidbox: dropped expired request (expired at %s)',
                         expires)
        return expired

    def _run(self, request):
        if self._has_default_dispatch():
            return self.dispatch_core.run(self, request)
        return self.dispatch(
            request['method'], request.get('arguments'),
            request.get('reply_to'), request.get('ticket'),
            destination=request.get('destination'),
            pattern=request.get('pattern'), matcher=request.get('matcher'))

    def _log_received(self, method, arguments, reply_to, ticket):
        logger.debug('pidbox received method %s [reply_to:%s ticket:%s]',
                     reprcall(method, (), kwargs=arguments or {}), reply_to,
                     ticket)

    def _has_default_dispatch(self) -> bool:
        """True while dispatch/handle* are kombu's (not overridden, not
        patched on the class or the instance): the core may run requests."""
        cls = type(self)
        instance = self.__dict__
        for name, function in _DEFAULT_DISPATCH:
            if getattr(cls, name) is not function or name in instance:
                return False
        return True

    def _send_reply(self, reply, reply_to, ticket):
        exchange, routing_key = reply_to['exchange'], reply_to['routing_key']
        try:
            self.reply({self.hostname: reply}, exchange=exchange,
                       routing_key=routing_key, ticket=ticket)
        except EncodeError as exc:
            logger.error('pidbox: cannot serialize the reply for ticket %s: '
                         '%r', ticket, exc)
            self.reply({self.hostname: error_reply(exc)}, exchange=exchange,
                       routing_key=routing_key, ticket=ticket)

    def reply(self, data, exchange, routing_key, ticket, **kwargs):
        self.mailbox._publish_reply(data, exchange, routing_key, ticket,
                                    channel=self.channel,
                                    serializer=self.mailbox.serializer)


#: Node's own dispatch methods, to tell when a subclass or a patch replaced one.
_DEFAULT_DISPATCH = tuple((name, Node.__dict__[name])
                          for name in _DISPATCH_METHODS)
