"""A context manager usable with ``with`` and ``async with`` alike."""

from __future__ import annotations

from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class EitherWith(Generic[T]):
    """Subclasses define ``__enter__`` and ``__exit__``; ``async with`` runs them too
    (nothing they do waits)."""

    __slots__ = ()

    def __enter__(self) -> T:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> T:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
