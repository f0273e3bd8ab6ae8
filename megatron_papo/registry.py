"""Named registries: advantage estimators, policy losses and rewards are chosen by name from config or data."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """``name -> function``; ``where`` says where a user sets the name, for the error message."""

    def __init__(self, kind: str, where: str):
        self.kind, self.where = kind, where
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name`` (a second registration of the name is an error)."""
        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn
        return deco

    def get(self, name: str) -> F:
        if name not in self._items:
            raise ValueError(f"{self.where}: unknown {self.kind} {name!r}; choose one of "
                             f"{', '.join(sorted(self._items))}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)
