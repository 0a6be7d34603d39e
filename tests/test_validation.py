"""Request checks (api/validation.py) called directly, without Flask: a bad value is a 400
naming its field, defaults are filled in, query text becomes the declared type, and JSON
nested too deep, NaN or half a surrogate pair is refused before it can be a 500 (the
document they make: tests/test_openapi.py)."""
from __future__ import annotations

import pytest

from labmetal.api.errors import ApiError
from labmetal.api.validation import (MAX_JSON_DEPTH, Field, JsonRefused, from_text,
                                     nesting_depth, obj, parse_json, validate)

pytestmark = pytest.mark.fast

ROOM = obj("a new room",
           Field("name", str, required=True, pattern=r"^[a-z0-9-]{1,8}$"),
           Field("seats", int, minimum=1, maximum=40, default=20),
           Field("tags", list, items=Field("tag", str, max_length=5)),
           Field("note", str | None))


def refused(spec: Field, value: object) -> str:
    with pytest.raises(ApiError) as error:
        validate(spec, value)
    assert error.value.status == 400
    return error.value.message


def test_a_body_is_checked_field_by_field_and_gets_its_defaults():
    assert validate(ROOM, {"name": "tp1"}) == {"name": "tp1", "seats": 20}
    assert validate(ROOM, {"name": "tp1", "seats": 3.0, "note": None}) == \
        {"name": "tp1", "seats": 3, "note": None}  # 3.0 is an integer to JSON
    assert refused(ROOM, {"seats": 2}) == "Mandatory field missing: name"
    assert refused(ROOM, {"name": "tp1", "size": 2}) == \
        "Unknown attribute(s) for a new room: size; accepted: name, seats, tags, note"
    assert refused(ROOM, {"name": "TP 1"}).startswith("Invalid name 'TP 1': expected text")
    assert refused(ROOM, {"name": "tp1\n"}).startswith("Invalid name")  # "$" is the very end
    assert refused(ROOM, {"name": "tp1", "seats": 41}) == \
        "Invalid seats 41: expected a whole number from 1 to 40"
    assert refused(ROOM, {"name": "tp1", "seats": True}).startswith("Invalid seats: expected")
    assert refused(ROOM, {"name": "tp1", "tags": ["ok", "too-long"]}) == \
        "Invalid tags[1]: expected at most 5 characters"
    assert refused(ROOM, ["tp1"]).startswith("The request body must be ")


def test_query_text_becomes_the_declared_type():
    assert from_text(Field("maintenance", bool), "Yes") is True
    assert from_text(Field("maintenance", bool), "off") is False
    assert from_text(Field("limit", int), "50") == 50
    assert from_text(Field("fields", list), "uuid, name,,") == ["uuid", "name"]
    with pytest.raises(ApiError, match="Invalid maintenance 'perhaps': expected true or false"):
        from_text(Field("maintenance", bool), "perhaps")
    with pytest.raises(ApiError, match="Invalid limit 'x'"):
        from_text(Field("limit", int), "x")
    with pytest.raises(ApiError, match="Invalid ratio"):
        validate(Field("ratio", float), from_text(Field("ratio", float), "nan"), "ratio")


def test_json_that_would_be_a_500_is_refused_clearly():
    assert parse_json(b'{"name": "[[[[", "seats": [1, [2]]}') == \
        {"name": "[[[[", "seats": [1, [2]]}
    assert nesting_depth('{"a": "[[[[{{{", "b": [[1]]}') == 3  # brackets in strings do not count
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(JsonRefused, match="nested deeper"):
        parse_json(deep)
    parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    with pytest.raises(JsonRefused, match="NaN is not a JSON number"):
        parse_json('{"a": NaN}')
    with pytest.raises(JsonRefused, match="too large a number"):
        parse_json('{"a": 1e999}')
    with pytest.raises(JsonRefused, match="surrogate"):
        parse_json('{"a": "\\ud800"}')
