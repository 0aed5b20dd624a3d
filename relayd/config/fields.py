"""How a setting is declared: one dataclass field carrying its TOML key and env name.

A section is a frozen dataclass named after its TOML table; each of its fields is
made with :func:`setting`, which records where the value may come from. The loader
(:mod:`relayd.config.load`) reads those records and nothing else, so adding a
setting is adding one field (hypercorn's config-by-name, Starlette's cast-by-type).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["SECTION_KEY", "Declared", "declared", "setting"]

# The metadata entry a field made by setting() carries.
SECTION_KEY: Final = "relayd.setting"


@dataclass(frozen=True, slots=True)
class Declared:
    """Where one setting's value comes from.

    ``key`` is its TOML key in the section's table and ``env`` the environment
    variable that overrides it (None: the file only). ``path``: a file name read
    relative to the config file. ``off``: the value that means "off", stored as
    None, as opposed to leaving the key out, which keeps the default. ``parse``
    replaces the cast by type (text or TOML value, where → value). ``also``:
    further TOML keys this setting reads (a secret's ``*_file`` form). ``special``:
    the loader fills it by hand (secrets and relay keys come from several places).
    """

    key: str
    env: str | None = None
    path: bool = False
    off: Any = None
    parse: Callable[[Any, str], Any] | None = None
    also: tuple[str, ...] = ()
    special: bool = False
    # Filled in by declared(): the field's name and its type.
    name: str = ""
    hint: Any = None

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, *self.also)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    key: str,
    env: str | None = None,
    path: bool = False,
    off: Any = None,
    parse: Callable[[Any, str], Any] | None = None,
    also: tuple[str, ...] = (),
    special: bool = False,
    factory: Callable[[], Any] | None = None,
    repr: bool = True,
) -> Any:
    """A dataclass field declaring its TOML ``key`` and ``env`` name (see :class:`Declared`)."""
    meta = {SECTION_KEY: Declared(key, env, path, off, parse, also, special)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta, repr=repr)
    return field(default=default, metadata=meta, repr=repr)


def declared(section: type[Any]) -> Iterator[Declared]:
    """The settings of a section dataclass, in field order, with names and types."""
    hints = typing.get_type_hints(section)
    for item in dataclasses.fields(section):
        record = item.metadata.get(SECTION_KEY)
        if record is not None:
            yield dataclasses.replace(record, name=item.name, hint=hints[item.name])
