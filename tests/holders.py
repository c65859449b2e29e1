"""A counter of concurrent holders, shared by the limit and mapped-step tests."""

from __future__ import annotations

import threading


class Holders:
    """Counts concurrent holders across tasks and threads; remembers the most seen at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1
