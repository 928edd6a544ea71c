"""The circuit breaker in front of each upstream."""

from __future__ import annotations

import time


class CircuitBreaker:
    """Stops sending to an upstream that keeps failing, so 300 clients do not each wait out
    a connect timeout. After `cooldown` one request may try again (half-open); its failure
    reopens the circuit at once, its success closes it.
    """

    def __init__(self, failures: int, cooldown: float) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold and time.monotonic() < self.open_until

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown
