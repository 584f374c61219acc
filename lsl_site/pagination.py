"""The API's pagination: DRF's limit/offset, with a page size cap and offsets a database can take."""

from __future__ import annotations

from typing import Any

from rest_framework.pagination import LimitOffsetPagination


class Pagination(LimitOffsetPagination):
    """`?limit=` above `max_limit` is clamped to it (so it never reaches SQL as an out-of-range integer);
    a negative, zero or non-numeric one means the default page size. `?offset=` is clamped below
    int64: nothing lies that far, and a bigger integer would overflow the database's."""

    max_limit = 200
    max_offset = 2**62

    def get_offset(self, request: Any) -> int:
        return min(super().get_offset(request), self.max_offset)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        """Strings, honestly: any value is accepted (see the class docstring), so the schema forbids none."""
        return [
            {"name": self.limit_query_param, "required": False, "in": "query",
             "description": f"Results per page: an integer, at most {self.max_limit} (a larger one is clamped to "
                            f"{self.max_limit}); missing, zero, negative or not an integer: {self.default_limit}.",
             "schema": {"type": "string", "example": str(self.default_limit or 50)}},
            {"name": self.offset_query_param, "required": False, "in": "query",
             "description": "Index of the first result: an integer; missing, negative or not an integer: 0.",
             "schema": {"type": "string", "example": "0"}},
        ]
