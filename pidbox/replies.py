"""Replies that arrived for a ticket nobody was collecting at the time."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from time import monotonic, time

from kombu.exceptions import ContentDisallowed, DecodeError

__all__ = ('Unclaimed', 'ReplyRouter')

logger = logging.getLogger(__name__)


class Unclaimed:
    """A bounded ``defaultdict(deque)`` of replies by ticket.

    kombu keeps replies for other tickets forever; a long-lived client that
    shares a reply queue grows without limit.  Here the oldest tickets are
    dropped once more than ``max_replies`` replies are held, and a ticket's
    replies are dropped ``max_age`` seconds after the first one arrived.
    Shared by every bound copy of a mailbox, in every thread: thread-safe.
    """

    def __init__(self, max_replies: int = 10_000, max_age: float = 60.0):
        self.max_replies = max_replies
        self.max_age = max_age
        self._tickets: OrderedDict = OrderedDict()   # ticket -> (born, deque)
        self._count = 0
        self._lock = threading.Lock()

    def add(self, ticket, reply) -> None:
        with self._lock:
            entry = self._tickets.get(ticket)
            if entry is None:
                entry = self._tickets[ticket] = (monotonic(), deque())
            entry[1].append(reply)
            self._count += 1
            self._evict()

    def _evict(self) -> None:
        tickets = self._tickets
        oldest_allowed = monotonic() - self.max_age
        while tickets:
            ticket, (born, replies) = next(iter(tickets.items()))
            if self._count <= self.max_replies and born >= oldest_allowed:
                break
            del tickets[ticket]
            self._count = max(0, self._count - len(replies))

    def __getitem__(self, ticket) -> deque:
        with self._lock:
            entry = self._tickets.get(ticket)
            if entry is None:
                entry = self._tickets[ticket] = (monotonic(), deque())
            return entry[1]

    def pop(self, ticket, *default):
        with self._lock:
            self._evict()
            try:
                _, replies = self._tickets.pop(ticket)
            except KeyError:
                if default:
                    return default[0]
                raise
            self._count = max(0, self._count - len(replies))
            return replies

    def __contains__(self, ticket) -> bool:
        return ticket in self._tickets

    def __len__(self) -> int:
        return len(self._tickets)

    def __iter__(self):
        return iter(self._tickets)

    def clear(self) -> None:
        with self._lock:
            self._tickets.clear()
            self._count = 0

    @property
    def reply_count(self) -> int:
        """How many replies are held, over all tickets."""
        return self._count


class ReplyRouter:
    """Hands each reply on a reply queue to the call waiting for its ticket.

    Replies for any other ticket go to :class:`Unclaimed`.  One router serves
    one reply consumer, which pidbox keeps open across calls on brokers where
    opening and cancelling a consumer costs round trips (AMQP).
    """

    def __init__(self, unclaimed: Unclaimed, clock) -> None:
        self.unclaimed = unclaimed
        self.adjust_clock = clock.adjust
        self.consumer = None
        self.channel = None
        self.accept = None
        self.ticket = None
        self.responses: list = []
        self.callback = None

    def expect(self, ticket, accept, callback=None) -> list:
        """Start waiting for ``ticket``; returns the list replies go to."""
        self.ticket = ticket
        self.accept = accept
        self.callback = callback
        self.responses = []
        return self.responses

    def done(self) -> None:
        self.ticket = self.callback = None
        self.responses = []

    def on_message(self, message) -> None:
        headers = message.headers or {}
        clock = headers.get('clock')
        self.adjust_clock(clock if type(clock) is int else 0)
        expires = headers.get('expires')
        if expires and isinstance(expires, (int, float)) and \
                time() > expires:
            return
        ticket = self.ticket
        this_id = headers.get('ticket', ticket)
        message.accept = self.accept
        try:
            body = message.decode()
        except (DecodeError, ContentDisallowed) as exc:
            if ticket is not None and this_id == ticket:
                raise  # the caller asked, and is told (as kombu does)
            logger.warning('pidbox: dropped reply for ticket %s: %r',
                           this_id, exc)
            return
        if ticket is not None and this_id == ticket:
            if self.callback:
                self.callback(body)
            self.responses.append(body)
            return
        try:
            self.unclaimed.add(this_id, body)
        except TypeError:  # an unhashable ticket from a stranger
            logger.warning('pidbox: dropped reply with ticket %r', this_id)
