"""One line for a profile file's schema errors: the field by its dotted path, what is wrong, the value.

Pydantic's own messages run to several lines per error and name internal types; a user editing a
YAML file needs the first problem, in the file's own words, and a "did you mean" for a misspelt key.
"""

from __future__ import annotations

from typing import Any, Optional, Union, get_args, get_origin

import pydantic
from pydantic import BaseModel

from ..core.errors import close_matches


class FieldError(ValueError):
    """A cross-field check that knows which field it is about."""

    def __init__(self, loc: tuple, message: str, value: Any):
        super().__init__(message)
        self.loc, self.message, self.value = loc, message, value


def short_value(value: Any, limit: int = 60) -> str:
    """A value as an error line shows it: strings quoted, long ones cut."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dotted(loc: tuple, root: type[BaseModel]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or root.__name__.lower()


def _model_at(root: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class that holds the fields at ``loc`` (for 'did you mean')."""
    model: Any = root
    for part in loc:
        if isinstance(part, int) or model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _unwrap_model(field.annotation)
    return model


def _unwrap_model(annotation: Any) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is Union:
        for arg in get_args(annotation):
            found = _unwrap_model(arg)
            if found is not None:
                return found
    return None


def _explain(root: type[BaseModel], err: dict) -> tuple[tuple, str, Any, bool]:
    """(loc, message, value, show_value) for one pydantic error dict."""
    kind, loc, ctx, value = err["type"], tuple(err["loc"]), err.get("ctx") or {}, err.get("input")
    if kind == "value_error" and isinstance(ctx.get("error"), FieldError):
        fe = ctx["error"]
        return fe.loc, fe.message, fe.value, fe.value is not None
    if kind == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        valid = [f for f in model.model_fields if f != "name"] if model else []
        hint = f"; {close_matches(str(loc[-1]), valid)}" if valid else ""
        return loc, f"is not a known field{hint}", value, False
    simple = {
        "missing": "is required",
        "greater_than": "must be > {gt}",
        "greater_than_equal": "must be >= {ge}",
        "less_than": "must be < {lt}",
        "less_than_equal": "must be <= {le}",
        "too_short": "must have at least {min_length} item(s)",
        "literal_error": "must be one of {expected}",
        "int_type": "must be an integer", "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number", "float_parsing": "must be a number",
        "bool_type": "must be true or false", "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list", "model_type": "must be a mapping of fields",
        "model_attributes_type": "must be a mapping of fields", "dict_type": "must be a mapping",
    }
    if kind in simple:
        shown = {k: f"{v:g}" if isinstance(v, float) else v for k, v in ctx.items()}
        return loc, simple[kind].format(**shown), value, kind != "missing"
    if kind == "value_error":
        return loc, str(ctx.get("error", err["msg"])), value, False
    return loc, err["msg"][:1].lower() + err["msg"][1:], value, True


def describe_validation_error(e: pydantic.ValidationError, root: type[BaseModel]) -> str:
    """One line for a pydantic ValidationError of model ``root``: the first problem, and how many more
    there are."""
    # A misspelt key also shows up as the missing field it was meant to be: name the typo first.
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
    loc, message, value, show_value = _explain(root, errors[0])
    line = f"{_dotted(loc, root)} {message}"
    if show_value:
        line += f" (got {short_value(value)})"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return line
