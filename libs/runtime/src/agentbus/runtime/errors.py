"""How a handler says what should happen to a message it could not process."""

from __future__ import annotations


class RetryableError(Exception):
    """A transient failure (a store or peer briefly unavailable): redeliver after a delay.

    After the consumer's `max_deliver` deliveries the message goes to the dead-letter stream.
    """

    def __init__(self, message: str, *, delay_seconds: float | None = None) -> None:
        super().__init__(message)
        self.delay_seconds = delay_seconds


class DependencyUnavailableError(RetryableError):
    """Something the handler needs is down (a peer service, a database, NATS itself): wait for it.

    Never a reason to give up on the message: it is redelivered with exponential backoff and jitter for as
    long as it takes, without counting towards the consumer's `max_deliver`.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


class TerminalError(Exception):
    """The message can never be processed (malformed, violates the contract): dead-letter it now."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ConfigurationError(ValueError):
    """A service cannot start with its configuration (a bad spec file, a missing folder).

    The message names the file and the field; the process prints it and exits non-zero.
    """
