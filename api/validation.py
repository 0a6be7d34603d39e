"""Declared request bodies and query parameters: one description serves both the check of
every request and the OpenAPI document (api/openapi.py), so the two cannot drift apart.

A view declares what it takes; the decorator checks the request before the view runs and
hands the view the checked values (defaults filled in), as the keyword ``body`` or
``query`` when the view has a parameter of that name::

    NEW_ROOM = obj("a new room",
                   Field("name", str, required=True, pattern=r"^[A-Za-z0-9._-]{1,64}$"),
                   Field("description", str | None))

    @blueprint.post("/v1/rooms")
    @authorize("room:create")  # above the check: a refused caller hears 403, not 400
    @body(NEW_ROOM)
    def create_room(body: dict[str, Any]): ...

A failed check is a 400 in Ironic's format that names the field: "Mandatory field missing:
name", "Invalid retries 'x': ...", "Unknown attribute(s) for a new room: size; accepted:
name, description". ``Field.error`` replaces the message for a bad value; ``Field.check``
adds what a schema cannot say (and may normalize the value): say it in ``description``,
since the document shows the schema only. A check that needs the database stays in the
view. Query values are text, converted by the declared type (``bool``: true/false, 1/0,
yes/no, on/off; ``list``: comma-separated); an empty one counts as absent, and parameters
not declared are left alone (Ironic's clients send more than labmetal reads).

A field whose valid values a reader (or tests/test_openapi.py, which builds requests from
the document) cannot guess, such as one with a pattern, carries an ``example``.

``@accepts`` and ``@produces`` only document: a body that is not JSON (image bytes, CSV),
a response that is not JSON (pages, files). A view with no declaration still appears in
the document, with its path parameters and policy.

Bodies are bounded before anything reads them (api/app.py): ``DEFAULT_BODY_LIMIT`` for
every view, unless it declares ``@streams(limit)`` (an image upload, read as a stream by
the view itself). JSON is parsed by ``parse_json``, which refuses what Python's parser
would take but the service cannot use: nesting deeper than ``MAX_JSON_DEPTH`` (the parser
and the checks recurse), NaN and infinities (not JSON; they break arithmetic later), lone
UTF-16 surrogates in strings (not text; the database cannot store them).

To convert a view: declare its body with ``obj(...)`` beside it, put ``@body(SPEC)`` (and
``@query(...)``) just above the ``def``, under ``@authorize``/``@public``, take ``body`` as
a parameter and delete the hand-written type, presence and unknown-attribute checks.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import request
from flask.json.provider import DefaultJSONProvider

from labmetal.api.auth import FORM_TYPES
from labmetal.names import is_uuid
from labmetal.api.errors import ApiError, bad_request

JSON = "application/json"
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
_NONE = type(None)
_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number",
                               bool: "boolean", dict: "object", list: "array", _NONE: "null"}
_WORDS: dict[Any, str] = {str: "a string", int: "a whole number", float: "a number",
                          bool: "true or false", dict: "a JSON object", list: "a JSON list",
                          _NONE: "null"}


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()

DEFAULT_BODY_LIMIT = 2**20  # bytes: any JSON body or CSV file; a view may declare @streams
MAX_JSON_DEPTH = 32  # objects and lists inside each other; labmetal's bodies use a few
# A string of JSON (escapes included), then the brackets outside strings.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


@dataclass(frozen=True)
class Field:
    """One value of a request: a body attribute, a query parameter, a list's item or a
    whole body. ``type`` is str, int, float, bool, dict, list, None, a union of them
    (``str | None``) or Any."""
    name: str
    type: Any = str
    required: bool = False
    description: str = ""
    enum: tuple[Any, ...] = ()
    pattern: str | None = None  # searched, as JSON Schema does: anchor it with ^...$
    format: str | None = None  # "uuid"
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    min_items: int | None = None
    items: Field | None = None  # a list's items
    fields: tuple[Field, ...] = ()  # an object's attributes
    extra: bool = False  # an object with fields may have others (kept, unchecked)
    default: Any = NO_DEFAULT
    example: Any = NO_DEFAULT  # a valid value, for the document (and tests) to show
    error: str | None = None  # the message for a bad value; may use {name} and {value!r}
    check: Callable[[Any], Any] | None = None

    @property
    def types(self) -> tuple[Any, ...]:
        """The accepted Python types; empty for Any."""
        if self.type is Any:
            return ()
        union = isinstance(self.type, types.UnionType)
        return tuple(_NONE if t is None else t for t in (
            self.type.__args__ if union else (self.type,)))


def obj(what: str, *fields: Field, extra: bool = False, description: str = "") -> Field:
    """A JSON object body; ``what`` names it in messages ("Unknown attribute(s) for a new
    room")."""
    return Field(what, dict, required=True, description=description, fields=fields,
                 extra=extra)


# -- checking ---------------------------------------------------------------------------
def validate(spec: Field, value: Any, path: str = "") -> Any:
    """The checked value, or ApiError 400. ``path`` names the value in messages ("seats[0]",
    "inventory.interfaces"); empty for a whole body."""
    label = path or spec.name
    if spec.types and not any(_is(value, kind) for kind in spec.types):
        expected = " or ".join(_WORDS[kind] for kind in spec.types)
        raise _invalid(spec, path, value, f"The request body must be {expected}" if not path
                       else f"Invalid {label}: expected {expected}")
    if isinstance(value, float) and int in spec.types and float not in spec.types:
        value = int(value)  # 2.0 is an integer to JSON Schema
    if value is None:
        return spec.check(value) if spec.check else None
    if spec.enum and not any(type(value) is type(c) and value == c for c in spec.enum):
        raise _invalid(spec, path, value, f"Invalid {label} {value!r}; expected one of "
                                          f"{', '.join(str(c) for c in spec.enum)}")
    if isinstance(value, str):
        _check_text(spec, path, value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(spec, path, value)
    elif isinstance(value, list):
        if spec.min_items is not None and len(value) < spec.min_items:
            raise _invalid(spec, path, value,
                           f"Invalid {label}: expected at least {spec.min_items} item(s)")
        if spec.items is not None:
            value = [validate(spec.items, item, f"{label}[{i}]") for i, item in enumerate(value)]
    elif isinstance(value, dict) and spec.fields:
        value = _check_object(spec, path, value)
    return spec.check(value) if spec.check else value


def _is(value: Any, kind: Any) -> bool:
    if kind is int:
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is _NONE:
        return value is None
    return isinstance(value, kind)


def _check_text(spec: Field, path: str, value: str) -> None:
    label = path or spec.name
    if spec.max_length is not None and len(value) > spec.max_length:
        raise _invalid(spec, path, value,
                       f"Invalid {label}: expected at most {spec.max_length} characters")
    if spec.pattern is not None and not _pattern(spec.pattern).search(value):
        raise _invalid(spec, path, value,
                       f"Invalid {label} {value!r}: expected text matching {spec.pattern}")
    if spec.format == "uuid" and not is_uuid(value):
        raise _invalid(spec, path, value, f"Invalid {label} {value!r}: expected a UUID")


@functools.cache
def _pattern(pattern: str) -> re.Pattern[str]:
    """As JSON Schema reads it: "$" is the very end (Python's also matches before a final
    newline)."""
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern))


def _check_number(spec: Field, path: str, value: float) -> None:
    if not math.isfinite(value):  # "nan" or "inf" in a query; JSON bodies have none
        raise _invalid(spec, path, value, f"Invalid {path or spec.name} {value!r}: expected "
                                          f"{_WORDS[int if int in spec.types else float]}")
    low, high = spec.minimum, spec.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"from {low:g} to {high:g}" if low is not None and high is not None
                  else f"at least {low:g}" if low is not None else f"at most {high:g}")
        raise _invalid(spec, path, value, f"Invalid {path or spec.name} {value!r}: expected "
                                          f"{_WORDS[int if int in spec.types else float]} "
                                          f"{bounds}")


def _check_object(spec: Field, path: str, value: dict[str, Any]) -> dict[str, Any]:
    names = [field.name for field in spec.fields]
    unknown = sorted(set(value) - set(names))
    if unknown and not spec.extra:
        raise bad_request(f"Unknown attribute(s) for {path or spec.name}: "
                          f"{', '.join(unknown)}; accepted: {', '.join(names)}")
    checked = dict(value)
    for field in spec.fields:
        inner = f"{path}.{field.name}" if path else field.name
        if field.name in value:
            checked[field.name] = validate(field, value[field.name], inner)
        elif field.required:
            hint = f" ({field.description})" if field.description else ""
            raise bad_request(f"Mandatory field missing: {inner}{hint}")
        elif field.default is not NO_DEFAULT:
            checked[field.name] = field.default
    return checked


def _invalid(spec: Field, path: str, value: Any, message: str) -> ApiError:
    if spec.error:
        message = spec.error.format(name=path or spec.name, value=value)
    return bad_request(message)


def from_text(spec: Field, raw: str) -> Any:
    """A query parameter's text as the declared type (then checked by ``validate``)."""
    kinds = [kind for kind in spec.types if kind is not _NONE]
    if list in kinds:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if bool in kinds:
        if raw.lower() in TRUE_WORDS + FALSE_WORDS:
            return raw.lower() in TRUE_WORDS
        raise _invalid(spec, spec.name, raw, f"Invalid {spec.name} {raw!r}: expected true or "
                                             "false")
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(raw)
            except ValueError:
                raise _invalid(spec, spec.name, raw, f"Invalid {spec.name} {raw!r}: expected "
                                                     f"{_WORDS[kind]}") from None
    return raw


def check_query(params: tuple[Field, ...]) -> dict[str, Any]:
    """The declared query parameters of the current request, checked."""
    checked: dict[str, Any] = {}
    for spec in params:
        raw = request.args.get(spec.name, "")
        if raw != "":
            checked[spec.name] = validate(spec, from_text(spec, raw), spec.name)
        elif spec.required:
            hint = f" ({spec.description})" if spec.description else ""
            raise bad_request(f"Mandatory query parameter missing: {spec.name}{hint}")
        elif spec.default is not NO_DEFAULT:
            checked[spec.name] = spec.default
    return checked


# -- reading JSON -------------------------------------------------------------------------
class JsonRefused(ValueError):
    """A body that is JSON text but not one the service takes; the message says why."""


def parse_json(data: str | bytes) -> Any:
    """The JSON value of ``data``, or JsonRefused (ValueError). The depth is counted before
    parsing: Python's parser recurses once per level, and a body of a few thousand ``[``
    would end in RecursionError, a 500, instead of a clear 400. A string holding half of a
    UTF-16 surrogate pair ("\\ud800" alone) is JSON but not text: the database cannot
    store it (UnicodeEncodeError, a 500), so it is refused here too."""
    text = data.decode(json.detect_encoding(data), "surrogatepass") \
        if isinstance(data, bytes) else data
    if nesting_depth(text) > MAX_JSON_DEPTH:
        raise JsonRefused(f"objects and lists are nested deeper than {MAX_JSON_DEPTH} levels")
    value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise JsonRefused("a string holds a lone UTF-16 surrogate (\\ud800 to \\udfff): "
                          "not Unicode text") from None
    return value


def nesting_depth(text: str) -> int:
    """How deep objects and lists nest in JSON text (strings left out); it stops counting
    once past MAX_JSON_DEPTH."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        if bracket.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
        else:
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRefused(f"{text[:40]} is too large a number")
    return value


class RequestJSON(DefaultJSONProvider):
    """Flask's JSON, with ``parse_json`` for every request body (``request.get_json``)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return parse_json(s)


def json_body() -> Any:
    """The request's JSON body; None when it is not sent as JSON (the check then says what
    was expected); a 400 that says why when it is not valid JSON."""
    if not request.is_json:
        return None
    try:
        return parse_json(request.get_data(cache=True))
    except ValueError as error:  # JsonRefused, json's own errors, bad UTF-8
        raise bad_request(f"The request body is not valid JSON: {error}") from None


# -- what the views wear ------------------------------------------------------------------
@dataclass(frozen=True)
class RequestBody:
    """What a view's body is, for the document: ``spec`` for JSON (checked), else only the
    media types and a description."""
    spec: Field | None
    media_types: tuple[str, ...] = (JSON,)
    required: bool = True
    description: str = ""


def body(spec: Field, optional: bool = False, form: bool = False) -> Callable:
    """Check the JSON body against ``spec`` (an ``obj``, or a list Field) before the view.
    ``optional``: an empty body counts as ``{}``. ``form``: an HTML form post is taken
    too, its fields as strings."""
    media = (JSON, FORM_TYPES[0]) if form else (JSON,)

    def wrap(view: Callable) -> Callable:
        takes = _takes(view, "body")

        @functools.wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if form and request.mimetype in FORM_TYPES:
                value: Any = request.form.to_dict()
            elif optional and not request.get_data():
                value = {}
            else:
                value = json_body()
            value = validate(spec, value)
            return view(*args, **kwargs, **({"body": value} if takes else {}))
        checked.request_body = RequestBody(spec, media, not optional)  # type: ignore[attr-defined]
        return checked
    return wrap


def query(*params: Field) -> Callable:
    """Check the query parameters ``params`` before the view."""
    def wrap(view: Callable) -> Callable:
        takes = _takes(view, "query")

        @functools.wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            values = check_query(params)
            return view(*args, **kwargs, **({"query": values} if takes else {}))
        checked.query_params = params  # type: ignore[attr-defined]
        return checked
    return wrap


def streams(limit: Callable[[], int]) -> Callable[[Callable], Callable]:
    """The view reads its body itself, as a stream, up to ``limit()`` bytes (a setting, read
    per request) instead of DEFAULT_BODY_LIMIT: an image upload. It checks Content-Length
    itself (with its own message); api/app.py still stops a longer body as it is read."""
    def mark(view: Callable) -> Callable:
        view.body_limit = limit  # type: ignore[attr-defined]
        return view
    return mark


def body_limit(view: Callable | None) -> tuple[int, bool]:
    """The most bytes the view's body may have, and whether the view checks Content-Length
    itself (``@streams``)."""
    limit = getattr(view, "body_limit", None)
    return (limit(), True) if limit is not None else (DEFAULT_BODY_LIMIT, False)


def takes_form(view: Callable | None) -> bool:
    """The view takes an HTML form post (``@body(..., form=True)``)."""
    declared = getattr(view, "request_body", None)
    return declared is not None and FORM_TYPES[0] in declared.media_types


def accepts(media_type: str, description: str) -> Callable[[Callable], Callable]:
    """Document a body that is not JSON; the view reads and checks it itself."""
    def mark(view: Callable) -> Callable:
        view.request_body = RequestBody(  # type: ignore[attr-defined]
            None, (media_type,), True, description)
        return view
    return mark


def produces(*media_types: str) -> Callable[[Callable], Callable]:
    """Document a response that is not JSON (a page, a file)."""
    def mark(view: Callable) -> Callable:
        view.produces = media_types  # type: ignore[attr-defined]
        return view
    return mark


def _takes(view: Callable, name: str) -> bool:
    return name in inspect.signature(view).parameters


# -- schemas ------------------------------------------------------------------------------
def schema(spec: Field) -> dict[str, Any]:
    """The JSON Schema (2020-12, as OpenAPI 3.1 uses) of what ``validate`` accepts."""
    out: dict[str, Any] = {}
    names = [_JSON_TYPES[kind] for kind in spec.types]
    if names:
        out["type"] = names[0] if len(names) == 1 else names
    if spec.description:
        out["description"] = spec.description
    if spec.enum:
        out["enum"] = list(spec.enum) + ([None] if _NONE in spec.types else [])
    for key, value in (("pattern", spec.pattern), ("format", spec.format),
                       ("minimum", spec.minimum), ("maximum", spec.maximum),
                       ("maxLength", spec.max_length), ("minItems", spec.min_items)):
        if value is not None:
            out[key] = value
    if spec.items is not None:
        out["items"] = schema(spec.items)
    if spec.fields:
        out["properties"] = {field.name: schema(field) for field in spec.fields}
        required = [field.name for field in spec.fields if field.required]
        if required:
            out["required"] = required
        out["additionalProperties"] = spec.extra
    if spec.default is not NO_DEFAULT:
        out["default"] = spec.default
    if spec.example is not NO_DEFAULT:
        out["examples"] = [spec.example]
    return out


# -- declarations several resources share -----------------------------------------------
PATCH = Field(
    "patch", list, required=True, description="a JSON patch (RFC 6902), as Ironic takes",
    error="The request body must be a JSON list of patch operations",
    items=obj("a patch operation",
              Field("op", str, required=True, enum=("add", "remove", "replace", "move", "copy",
                                                     "test")),
              Field("path", str, required=True, description="a JSON pointer: /name, /extra/key"),
              Field("value", Any, description="for add, replace and test"),
              Field("from", str, description="for move and copy"),
              extra=True))


DOT_NAMES = (".", "..")  # path segments that URLs remove: such a name could not be asked for


def name_check(error: str) -> Callable[[str | None], str | None]:
    """A ``check`` for the names of things found by name or UUID in a URL (nodes, images,
    rooms): a name must not look like a UUID, nor be ``.`` or ``..``, which clients and
    proxies fold away (``/v1/nodes/..`` is ``/v1``)."""
    def check(name: str | None) -> str | None:
        if name is not None and (is_uuid(name) or name in DOT_NAMES):
            raise bad_request(error.format(value=name))
        return name
    return check


def fields_param(names: tuple[str, ...]) -> Field:
    """Ironic's ``?fields=a,b``: only these fields of each object (and its links)."""
    return Field("fields", list, description="comma-separated fields to return",
                 items=Field("field", str, enum=names, error="Field {value!r} is not valid; "
                             f"valid fields: {', '.join(names)}"))


DETAIL = Field("detail", bool, default=False, description="every field, not a summary")


def paging(sort_keys: tuple[str, ...]) -> tuple[Field, ...]:
    """Ironic's pagination of a collection: a page has a ``next`` link when it is full."""
    return (Field("limit", int, minimum=0, description="objects per page (0 or none: 1000)"),
            Field("marker", str, description="the UUID of the last object of the page before"),
            Field("sort_key", str, enum=sort_keys, default="id"),
            Field("sort_dir", str, enum=("asc", "desc"), default="asc"))
