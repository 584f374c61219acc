"""Serializer fields that accept exactly what the OpenAPI schema says they accept.

DRF's own are lenient in ways a schema cannot state: a CharField takes `42` and stores "42", a
SlugField trims " x " to "x", a UUIDField takes an integer. The schema says "string" (and a slug
pattern), so clients and the fuzzer (tests/test_schemathesis.py) are told the truth only if the
server refuses the rest with a 400.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

# A path segment naming an object by slug: the router's default minus NUL (see names_nothing).
SLUG_LOOKUP_REGEX = "[^/.\x00]+"


def names_nothing(value: str) -> bool:
    """True for a string no stored name can equal: one with a NUL byte. Nothing LSL stores has one
    (its CharFields refuse them), and PostgreSQL refuses a NUL in any text parameter (psycopg raises
    DataError: a 500) where SQLite just finds no row. Lookups from user input check this first, so
    both databases answer "no such thing"."""
    return "\x00" in value


class StrictCharField(serializers.CharField):
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        # The schema's maxLength is of the string sent; DRF checks it after trimming, so "\r" + 100
        # characters would be taken. Both count code points.
        if self.max_length is not None and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().to_internal_value(data)


class StrictSlugField(serializers.SlugField):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)  # " name" is not a slug; the schema's pattern says so
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictUUIDField(serializers.UUIDField):
    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class StrictSlugRelatedField(serializers.SlugRelatedField):
    """An object by its slug (or username...), named by a string: `{"team": 0}` is not team "0", and
    `{"team": ""}` is not `{"team": null}` (DRF's RelatedField reads "" as null; the schema cannot say so)."""

    def run_validation(self, data: Any = serializers.empty) -> Any:
        if data == "":
            self.fail("invalid")
        return super().run_validation(data)

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid")
        if names_nothing(data):
            self.fail("does_not_exist", slug_name=self.slug_field, value=data)
        return super().to_internal_value(data)
