"""``NamedTuple`` class syntax without importing :mod:`typing` at run time.

`qsnap list` must start in a few tens of milliseconds, and importing :mod:`typing` pulls in
:mod:`re` and :mod:`enum` (several ms here). The modules on that path write::

    TYPE_CHECKING = False
    if TYPE_CHECKING:
        from typing import NamedTuple          # what mypy checks against
    else:
        from qsnap.core.records import NamedTuple

and get, at run time, the same thing ``typing.NamedTuple`` builds: a
:func:`collections.namedtuple` with the class's fields, defaults, methods and properties.
"""

from __future__ import annotations

import collections

_SKIP = frozenset(
    {"__annotations__", "__module__", "__qualname__", "__dict__", "__weakref__", "__doc__", "__classcell__"}
)


class _NamedTupleMeta(type):
    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, object]) -> type:
        if not bases:  # the NamedTuple marker class itself
            return super().__new__(mcs, name, bases, namespace)
        fields = list(namespace.get("__annotations__", {}))  # type: ignore[call-overload]
        defaults = [namespace[f] for f in fields if f in namespace]
        make = collections.namedtuple  # called through a name: mypy wants literal arguments
        cls: type = make(name, fields, defaults=defaults, module=str(namespace["__module__"]))
        cls.__qualname__ = str(namespace.get("__qualname__", name))
        if namespace.get("__doc__"):
            cls.__doc__ = str(namespace["__doc__"])
        for key, value in namespace.items():
            if key not in _SKIP and key not in fields:
                setattr(cls, key, value)
        return cls


class NamedTuple(metaclass=_NamedTupleMeta):
    """Base for record classes; see the module docstring."""
