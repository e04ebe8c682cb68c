"""A work queue shared by tenants and served in turn: one tenant's backlog never holds back another's next item.

``TurnQueue`` keeps each owner's items in order and hands them out one owner at a time, round-robin: an owner
with 100 waiting items and an owner with one are served alternately, so the second waits for at most one item
per other owner with waiting work (plus what is already running), not for the whole backlog ahead of it.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class TurnQueue(Generic[T]):
    """Items per owner, taken in turn across owners (module docstring); thread-safe, ``get`` blocks."""

    def __init__(self) -> None:
        self._items: dict[str, deque[T]] = {}  # owner -> its waiting items, oldest first
        self._turns: deque[str] = deque()  # owners with waiting items, the next to be served first
        self._cond = threading.Condition()
        self._closed = False

    def put(self, owner: str, item: T) -> None:
        with self._cond:
            if self._closed:
                return
            waiting = self._items.get(owner)
            if waiting is None:
                waiting = self._items[owner] = deque()
                self._turns.append(owner)
            waiting.append(item)
            self._cond.notify()

    def get(self) -> T | None:
        """The next item (waits for one); None once the queue is closed."""
        with self._cond:
            while not self._turns and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            owner = self._turns.popleft()
            waiting = self._items[owner]
            item = waiting.popleft()
            if waiting:
                self._turns.append(owner)  # its next item after every other owner's
            else:
                del self._items[owner]
            return item

    def close(self) -> list[T]:
        """Stop handing out items: every ``get`` returns None from now on. Returns the items still waiting."""
        with self._cond:
            self._closed = True
            left = [item for waiting in self._items.values() for item in waiting]
            self._items.clear()
            self._turns.clear()
            self._cond.notify_all()
            return left

    def __len__(self) -> int:
        with self._cond:
            return sum(len(waiting) for waiting in self._items.values())
