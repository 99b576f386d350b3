"""Exceptions and wire constants shared by both dispatch implementations.

Kept in a plain module so the compiled core and its pure twin raise the very
same classes and agree on every name that crosses the wire.
"""

from __future__ import annotations

from kombu.exceptions import ContentDisallowed, DecodeError, InconsistencyError

__all__ = (
    'MalformedRequest', 'ContentDisallowed', 'DecodeError',
    'InconsistencyError', 'ROUTE_HEADER', 'ROUTING_KEYS', 'TRUSTED_CONTENT',
    'INSECURE_CONTENT',
)

#: Header in which pidbox clients repeat ``[destination, pattern, matcher]``
#: so that a pidbox node can route without reading the body.  Stock kombu
#: nodes ignore unknown headers; stock kombu clients never send it.
ROUTE_HEADER = 'pidbox-route'

#: Body keys that decide whether a node is addressed.
ROUTING_KEYS = ('destination', 'pattern', 'matcher')

#: Content types kombu accepts whatever the accept list says.
TRUSTED_CONTENT = frozenset(['application/data', 'application/text'])

#: Content types refused when no accept list was given (kombu would run them).
INSECURE_CONTENT = frozenset([
    'application/x-python-serialize',   # pickle
    'application/x-yaml',
])


class MalformedRequest(DecodeError):
    """A request that decoded but is not a well-formed pidbox request.

    ``field`` names the offending part of the message (``'body'``,
    ``'method'``, ``'arguments'``, ``'destination'``, a header name...), so the
    log line says what to fix at the sender.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f'malformed pidbox request: {field}: {reason}')

    def __reduce__(self):
        return type(self), (self.field, self.reason)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, MalformedRequest) and
                (self.field, self.reason) == (other.field, other.reason))

    def __hash__(self) -> int:
        return hash((self.field, self.reason))
