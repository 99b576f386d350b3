"""Run a mailbox node as a service that outlives broker connection loss.

:class:`NodeService` serves one node with kombu's
:class:`~kombu.mixins.ConsumerMixin`: when the connection drops it
reconnects with kombu's connection retry, declares the node queue again and
keeps answering.  ``python -m pidbox.service --help`` runs a demonstration
node (``ping``, ``echo``, ``count``, ``boom``) used by the broker tests.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections import Counter
from typing import Any, Callable, Mapping

from kombu import Connection
from kombu.mixins import ConsumerMixin

from .mailbox import channel_is_gone

__all__ = ('NodeService', 'example_handlers', 'main')

logger = logging.getLogger(__name__)

#: printed (with the hostname) each time the service starts consuming.
READY = 'READY'


class NodeService(ConsumerMixin):
    """Serve ``hostname``'s mailbox node until :attr:`should_stop` is set.

    ``mailbox`` may be bound or not (a :class:`pidbox.Mailbox` or a
    :class:`kombu.pidbox.Mailbox`); the service binds a copy to each
    connection it makes, so replies go out on the live one.  ``connection``
    is only a template: kombu's mixin consumes on a clone of it.
    """

    def __init__(self, connection: Connection, mailbox: Any, hostname: str,
                 handlers: Mapping[str, Callable] | None = None,
                 state: Any = None,
                 on_ready: Callable[[NodeService], None] | None = None):
        self.connection = connection
        self.mailbox = mailbox
        self.hostname = hostname
        self.node = mailbox.Node(hostname, state=state,
                                 handlers=dict(handlers or {}))
        self._on_ready = on_ready
        self.consumer = None

    def get_consumers(self, Consumer, channel):
        # A fresh connection each time: rebind the node to it, since the
        # node replies on node.channel through its mailbox.
        self.node.mailbox = self.mailbox(channel.connection.client)
        self.node.channel = channel
        self.consumer = self.node.listen(channel=channel)
        return [self.consumer]

    def on_consume_ready(self, connection, channel, consumers, **kwargs):
        logger.info('pidbox: node %s consuming on %s', self.hostname,
                    connection.as_uri())
        if self._on_ready is not None:
            self._on_ready(self)

    def on_iteration(self):
        # A reply published with retry=True reconnects the connection in
        # place, leaving the consumer on a dead channel that only times out:
        # make the mixin reconnect and consume again.
        channel = self.node.channel
        if channel is not None and channel_is_gone(channel):
            raise OSError(f'pidbox: channel of node {self.hostname} closed')

    def on_connection_error(self, exc, interval):
        logger.warning('pidbox: node %s lost the broker (%r); '
                       'retrying in %.1fs', self.hostname, exc, interval)

    def stop(self) -> None:
        self.should_stop = True


def example_handlers() -> dict[str, Callable]:
    """The demonstration commands: ``ping``, ``echo``, ``count``, ``boom``.

    ``count(tag=...)`` counts one received command under ``tag`` and returns
    the new count; ``count()`` without a tag returns every count so far.
    State is a dict with the ``hostname`` and a ``counts`` Counter.
    """
    def ping(state):
        return {'ok': 'pong'}

    def echo(state, value=None):
        return value

    def count(state, tag=None):
        counts = state['counts']
        if tag is None:
            return dict(counts)
        counts[tag] += 1
        return counts[tag]

    def boom(state, message='boom'):
        raise RuntimeError(message)

    return {'ping': ping, 'echo': echo, 'count': count, 'boom': boom}


def _mailbox_class(impl: str):
    if impl == 'kombu':
        from kombu.pidbox import Mailbox
    else:
        from pidbox import Mailbox
    return Mailbox


def named_transport_options(url: str, name: str | None) -> dict:
    """Transport options that make the broker show ``name`` for us."""
    if not name:
        return {}
    scheme = url.split('://', 1)[0].lower()
    if scheme in ('redis', 'rediss'):
        return {'client_name': name}
    if scheme in ('amqp', 'amqps', 'pyamqp'):
        return {'client_properties': {'connection_name': name}}
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m pidbox.service',
        description='Serve a demonstration pidbox node (ping, echo, count, '
                    'boom) until SIGTERM/SIGINT, reconnecting on '
                    'connection loss.')
    parser.add_argument('--broker', default='amqp://guest:guest@127.0.0.1//')
    parser.add_argument('--hostname', required=True)
    parser.add_argument('--namespace', default='pidbox')
    parser.add_argument('--type', default='fanout',
                        choices=('direct', 'fanout'))
    parser.add_argument('--serializer', default='json',
                        choices=('json', 'msgpack'))
    parser.add_argument('--impl', default='pidbox',
                        choices=('pidbox', 'kombu'),
                        help='mailbox implementation: pidbox or '
                             'kombu.pidbox (for interoperability tests)')
    parser.add_argument('--connection-name', default=None,
                        help='name the broker connections (Redis CLIENT '
                             'SETNAME, AMQP connection_name), so they can '
                             'be found and closed')
    parser.add_argument('--loglevel', default='WARNING')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(name)s: '
                               '%(message)s')
    accept = ['json'] if args.serializer == 'json' else ['json',
                                                          args.serializer]
    mailbox = _mailbox_class(args.impl)(
        args.namespace, type=args.type, serializer=args.serializer,
        accept=accept)
    state = {'hostname': args.hostname, 'counts': Counter()}

    def ready(service):
        print(READY, service.hostname, flush=True)

    service = NodeService(
        Connection(args.broker, transport_options=named_transport_options(
            args.broker, args.connection_name)), mailbox, args.hostname,
        handlers=example_handlers(), state=state, on_ready=ready)

    def stop(signum, frame):
        service.stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
