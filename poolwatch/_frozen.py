"""Frozen dataclasses built at a third of what their own ``__init__`` costs.

A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``, ~300 ns a
field on a slow machine: a scrape of 100 busy pools builds ~2,000 snapshots (pools, origins,
histograms) and spent a third of its read there. The snapshot types stay frozen dataclasses
(equality, ``repr``, no assignment: readers share them); poolwatch builds its own through a
writable twin with the very same slots, then gives the twin the frozen class, which Python
allows between classes of one layout.

Not on a free-threaded build: there, assigning ``__class__`` stops every thread of the process
(CPython #120672), so the builders are the classes' own constructors (``TWINS`` is false).
"""

from __future__ import annotations

import sysconfig
from typing import Any

#: Whether builders may use twins (not on a free-threaded build, see above).
TWINS = not sysconfig.get_config_var("Py_GIL_DISABLED")


def writable_twin(cls: type) -> type[Any]:
    """A class with ``cls``'s slots and a plain ``__setattr__``.

    Fill an instance's every field, then assign ``cls`` to its ``__class__``. A field left
    unset raises ``AttributeError`` when read, so each builder is tested against ``cls``'s own
    constructor. A ``cls`` whose layout differs from the twin's fails here, at import.
    """
    slots = cls.__dict__.get("__slots__")
    if not isinstance(slots, tuple) or "__dict__" in slots or cls.__base__ is not object:
        raise TypeError(f"{cls.__name__} is not a slots dataclass of its own")
    twin = type(f"_Writable{cls.__name__}", (), {"__slots__": slots})
    twin().__class__ = cls  # the layouts agree, or TypeError now rather than at a scrape
    return twin
