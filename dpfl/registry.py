"""A small name -> factory registry whose lookup errors list the valid names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from dpfl.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names to factories.

    Args:
        kind: what the registry holds, used in error messages ("accountant", "optimizer").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T] | None = None, *, force: bool = False):
        """Registers ``factory`` under ``name``; usable as a decorator when ``factory`` is None."""

        def _add(f: Callable[..., T]) -> Callable[..., T]:
            key = name.lower()
            if key in self._factories and not force:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[key] = f
            return f

        return _add if factory is None else _add(factory)

    def get(self, name: str) -> Callable[..., T]:
        """Returns the factory registered under ``name`` (case-insensitive)."""
        try:
            return self._factories[str(name).lower()]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, *args, **kwargs) -> T:
        """Builds the object registered under ``name``."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
