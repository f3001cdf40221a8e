"""Model registry: ``@register_model("name")`` on a class, ``create_model("name", ...)`` to build one.

Parameters are checked against the constructor's signature before anything is built, so a typo
in a config (``hiden_dim``) fails with the list of valid parameters instead of a TypeError.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from milhema.errors import ConfigError, did_you_mean
from milhema.models.base import MILModel

_REGISTRY: dict[str, type[MILModel]] = {}
# Old names kept working: a name a model once had, or the paper a user expects (transmil).
_ALIASES: dict[str, str] = {}

# Passed by create_model itself, so never accepted inside **params.
_FIXED = ("in_dim", "n_classes", "cbc_dim", "fusion")


def register_model(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type[MILModel]], type[MILModel]]:
    """Class decorator registering a :class:`MILModel` subclass under ``name`` (and ``aliases``, other
    names that build the same model: a former name, documented as such)."""

    def decorate(cls: type[MILModel]) -> type[MILModel]:
        if not (isinstance(cls, type) and issubclass(cls, MILModel)):
            raise TypeError(f"@register_model({name!r}) needs a MILModel subclass, got {cls!r}")
        for key in (name, *aliases):
            if _REGISTRY.get(_ALIASES.get(key, key), cls) is not cls:
                raise ValueError(f"model name {key!r} is already registered to {_REGISTRY[_ALIASES.get(key, key)].__qualname__}")
        _REGISTRY[name] = cls
        _ALIASES.update(dict.fromkeys(aliases, name))
        return cls

    return decorate


def list_models(*, aliases: bool = False) -> list[str]:
    """Names of all registered models, sorted (with ``aliases``, their other names too)."""
    return sorted([*_REGISTRY, *(_ALIASES if aliases else ())])


def canonical_name(name: str) -> str:
    """The registered name of model ``name`` (itself, or what an alias stands for)."""
    return _ALIASES.get(name, name)



def model_params(name: str) -> dict[str, Any]:
    """The tunable parameters of model ``name`` with their defaults (excluding in_dim, n_classes, cbc_dim, fusion)."""
    cls = _lookup(name)
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.name not in _FIXED
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def model_class(name: str) -> type[MILModel]:
    """The class registered as ``name``.

    Raises:
        ConfigError: no model of that name (with the closest registered name).
    """
    return _lookup(name)


def _lookup(name: str) -> type[MILModel]:
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise ConfigError(f"model {name!r} is not registered; available: {', '.join(list_models())}"
                          f"{did_you_mean(str(name), list_models())}")
    return _REGISTRY[name]


def _check_type(model: str, param: str, value: Any, default: Any) -> None:
    """Refuse a value whose type clearly differs from the default's (e.g. ``"128"`` for an int)."""
    if default is None or default is inspect.Parameter.empty:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        raise ConfigError(f"model {model!r}: parameter {param!r} must be {type(default).__name__} "
                          f"(default {default!r}), got {value!r}")


def check_params(name: str, params: Mapping[str, Any]) -> None:
    """Refuse a parameter model ``name`` does not have, or a value of the wrong type, before anything is built.

    Raises:
        ConfigError: unknown model or parameter (with the closest valid name), or a wrong type.
    """
    valid = model_params(name)
    for key, value in params.items():
        if key not in valid:
            raise ConfigError(f"model {name!r} has no parameter {key!r}{did_you_mean(key, valid)}; "
                              f"valid parameters: {', '.join(sorted(valid))}")
        _check_type(name, key, value, valid[key])


def create_model(name: str, *, in_dim: int, n_classes: int, cbc_dim: int = 0, fusion: str = "none",
                 **params: Any) -> MILModel:
    """Build registered model ``name``.

    Args:
        name: a name from :func:`list_models`.
        in_dim: cell feature dimension D.
        n_classes: number of classes K.
        cbc_dim: width of the preprocessed CBC vector (0 = no CBC).
        fusion: CBC fusion mode (see :data:`milhema.models.fusion.FUSION_MODES`).
        **params: model hyper-parameters (``hidden_dim``, ``dropout``, model-specific ones).

    Raises:
        ConfigError: unknown model, unknown parameter, or an invalid parameter value.
    """
    cls = _lookup(name)
    check_params(name, params)
    try:
        return cls(in_dim=in_dim, n_classes=n_classes, cbc_dim=cbc_dim, fusion=fusion, **params)
    except ConfigError as err:
        raise ConfigError(f"model {name!r}: {err}") from err
