"""Registries of named plug-ins: each scorer and each routing policy is registered once, by name.

The scorer registry (``scheduler.core.scoring.registry``) and the policy registry
(``scheduler.core.policies.registry``) are both a ``Registry`` of their own spec records.
Configuration validates names against them, so an unknown name is refused where it is
written, naming itself and what is known. A second registration of a name is refused too
(as vLLM's ``EventPublisherFactory.register_publisher`` does, ``vllm/distributed/kv_events.py``):
two plug-ins answering to one name would make a configuration mean whichever loaded last.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


SpecT = TypeVar("SpecT", bound=Named)


class UnknownNameError(KeyError):
    """A name no plug-in was registered under; the message names it and the known ones."""

    def __init__(self, kind: str, name: str, known: tuple[str, ...]) -> None:
        super().__init__(name)
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:
        return f"no {self.kind} named {self.name!r} is registered (registered: {', '.join(self.known)})"


class Registry(Generic[SpecT]):
    """Specs by name, in registration order (the order defaults and listings follow)."""

    __slots__ = ("_kind", "_specs")

    def __init__(self, kind: str) -> None:
        self._kind = kind  # "scorer", "policy": for messages
        self._specs: dict[str, SpecT] = {}

    def add(self, spec: SpecT) -> SpecT:
        name = spec.name
        if not name or not name.isidentifier() or name != name.lower():
            raise ValueError(f"{self._kind} name {name!r} must be a lower-case identifier (snake_case)")
        if name in self._specs:
            raise ValueError(f"a {self._kind} named {name!r} is already registered")
        self._specs[name] = spec
        return spec

    def remove(self, name: str) -> None:
        """Forget ``name`` (a plug-in unloaded, or a test cleaning up after itself)."""
        if name not in self._specs:
            raise UnknownNameError(self._kind, name, self.names())
        del self._specs[name]

    def __getitem__(self, name: str) -> SpecT:
        spec = self._specs.get(name)
        if spec is None:
            raise UnknownNameError(self._kind, name, self.names())
        return spec

    def get(self, name: str) -> SpecT | None:
        return self._specs.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._specs))

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def specs(self) -> tuple[SpecT, ...]:
        return tuple(self._specs.values())
