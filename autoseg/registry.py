"""Named factories: one mechanism for every kind of plug-in (planners, trainers, networks, ...)."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

from autoseg.errors import AutosegError

T = TypeVar("T")

ENTRY_POINT_GROUP = "autoseg.plugins"


class Registry(Generic[T]):
    """A name -> object table whose failed look-ups suggest the nearest names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise AutosegError(f"two {self.kind}s are registered as {name!r}: {existing!r} and {obj!r}")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise AutosegError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(self.names()) or '(none)'}."
                f" A {self.kind} of your own is found through the '{ENTRY_POINT_GROUP}' entry points or"
                " --plugins FILE.py."
            )
        return self._items[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self._items[name]

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._items


_entry_points_loaded = False


def load_plugins() -> None:
    """Import every module named in the ``autoseg.plugins`` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party plug-in must not hide the built-ins
            print(f"autoseg: warning: plug-in {ep.name!r} ({ep.value}) failed to load: {exc}", file=sys.stderr)


def load_plugin_file(path: str | Path) -> None:
    """Import a plug-in kept in a file of the user's own (``--plugins FILE.py``)."""
    path = Path(path)
    if not path.is_file():
        raise AutosegError(f"plug-in file {path} does not exist (given with --plugins)")
    module_name = f"autoseg_user_plugin_{path.stem}"
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path.resolve():
        return  # already imported in this process: importing again would register everything twice
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise AutosegError(f"plug-in file {path} is not a Python module (given with --plugins)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
