"""The analysis registry: ``@analysis("glm")`` registers a class when its module is imported.

Registration errors happen at registration, naming both places, never at the first message.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from protocol.errors import RegistrationError, ValidationError

_REGISTRY: dict[str, Any] = {}
_WHERE: dict[str, str] = {}

T = TypeVar("T", bound=type)


def _where(obj: object) -> str:
    try:
        file = inspect.getsourcefile(obj)  # type: ignore[arg-type]
        line = inspect.getsourcelines(obj)[1]  # type: ignore[arg-type]
    except (OSError, TypeError):
        return "<unknown>"
    return f"{file}:{line}"


def analysis(name: str) -> Callable[[T], T]:
    """Class decorator registering an :class:`~analyses.base.Analysis` under ``name``."""
    from analyses.base import Analysis

    if not isinstance(name, str) or not name.isidentifier():
        raise RegistrationError(f"Cannot register analysis {name!r}: a name is a plain identifier")

    def register(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Analysis)):
            raise RegistrationError(
                f"Cannot register analysis {name!r}: {cls!r} is not an Analysis subclass"
            )
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise RegistrationError(
                f"Cannot register analysis {name!r}: it does not define {missing}"
            )
        if not isinstance(getattr(cls, "result_type", None), type):
            raise RegistrationError(
                f"Cannot register analysis {name!r}: it does not name its result_type (the "
                "AnalysisResult subclass its combine returns)"
            )
        if name in _REGISTRY and _WHERE[name] != _where(cls):
            raise RegistrationError(
                f"Cannot register analysis {name!r}: it is registered twice "
                f"({_WHERE[name]} and {_where(cls)})"
            )
        cls.name = name
        _REGISTRY[name] = cls()
        _WHERE[name] = _where(cls)
        return cls

    return register


def get_analysis(name: str) -> Any:
    """The registered analysis ``name``, or a ValidationError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValidationError(
            f"unknown analysis {name!r}; known: {', '.join(sorted(_REGISTRY))}"
        ) from None


def registered_analyses() -> list[str]:
    """Names of every registered analysis, sorted."""
    return sorted(_REGISTRY)
