"""Option groups: flags declared once for typer and handed to a command as one library object.

An :class:`OptionGroup` names the command parameter that receives the object (``runtime``, ``ray``,
``outputs``), the flags it stands for (each a typer option, declared once) and the function that
builds the object from their values. Decorating a command with a group replaces that parameter,
where it stands in the signature, by the flags, so ``--help`` lists and explains each flag as if
the command had declared it, and the command is called with the built object instead.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

CommandT = TypeVar("CommandT", bound=Callable[..., Any])


@dataclass(frozen=True)
class Flag:
    """One flag of a group: the parameter's type and a factory of its typer option (its declaration)."""

    kind: Any
    option: Callable[[], Any]


@dataclass(frozen=True)
class OptionGroup:
    """The flags a command parameter stands for, and how their values become the parameter's object."""

    parameter: str
    flags: dict[str, Flag]
    build: Callable[..., Any]  # called with every flag's value by name

    def __call__(self, command: CommandT) -> CommandT:
        """``command`` with its parameter :attr:`parameter` replaced, in place, by the group's flags."""
        signature = inspect.signature(command)
        if self.parameter not in signature.parameters:
            raise TypeError(f"{command.__name__} has no parameter {self.parameter!r} for its option group")
        clash = set(self.flags) & set(signature.parameters) - {self.parameter}
        if clash:
            raise TypeError(f"{command.__name__} declares {sorted(clash)} itself and in its option group")
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            if parameter.name != self.parameter:
                parameters.append(parameter)
                continue
            parameters.extend(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                default=flag.option(), annotation=flag.kind)
                              for name, flag in self.flags.items())

        @functools.wraps(command)
        def with_group(**arguments: Any) -> Any:
            values = {name: arguments.pop(name) for name in self.flags}
            return command(**arguments, **{self.parameter: self.build(**values)})

        with_group.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        with_group.__annotations__ = {
            **{name: value for name, value in command.__annotations__.items() if name != self.parameter},
            **{name: flag.kind for name, flag in self.flags.items()},
        }
        return with_group  # type: ignore[return-value]


def select_flags(flags: dict[str, Flag], names: tuple[str, ...], declared: dict[str, Any]) -> dict[str, Flag]:
    """The flags ``names`` of ``flags``, in that order; ``declared``: a flag's own typer option where a command's
    default or help differs (its type stays the group's)."""
    unknown = sorted(set(names) - set(flags)) + sorted(set(declared) - set(names))
    if unknown:
        raise TypeError(f"not flags of this group: {unknown}")
    return {name: Flag(flags[name].kind, functools.partial(_same, declared[name])) if name in declared
            else flags[name] for name in names}


def _same(option: Any) -> Any:
    return option


__all__ = ["Flag", "OptionGroup", "select_flags"]
