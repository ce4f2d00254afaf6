"""Query parameters, read strictly. Django and DRF take the last value of a parameter given twice,
and most readers ignore an empty or malformed one (DRF's page number and size, django-filter's
filters); here each is a 400 that names the parameter, so the API does what its schema says
(``core.api.AutoSchema``) and a client's mistake is not silently answered with something else.

Kept apart from ``core.api``: DRF imports the pagination class while it is still loading, before
drf-spectacular's ``AutoSchema`` can be imported.
"""

from __future__ import annotations

import re
from typing import Any

import django_filters
from django.db.models import QuerySet
from django.utils.translation import gettext_lazy as _
from rest_framework import filters, serializers
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request

#: A whole number as a query gives it: ASCII digits only (``int()`` would also take " 7", "+7", "7_0").
_WHOLE = re.compile(r"[0-9]+")
#: More digits than this are "very large" (past any page or cursor; ``int()`` refuses 4,300 digits).
_MAX_DIGITS = 18


def single_value(params: Any, name: str) -> str | None:
    """The one value of ``name`` in a query (a ``QueryDict``), ``None`` when it is absent. The same
    parameter twice is a 400 naming it: Django would quietly take the last one."""
    values = params.getlist(name)
    if len(values) > 1:
        raise ValidationError({name: [_("give this parameter once")]})
    return values[0] if values else None


def query_value(request: Request, name: str) -> str | None:
    """:func:`single_value` of the request's query."""
    return single_value(request.query_params, name)


def _repeated_or_empty(data: Any, names: Any) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for name in names:
        values = data.getlist(name) if hasattr(data, "getlist") else ([data[name]] if name in data else [])
        if len(values) > 1:
            errors[name] = [str(_("give this parameter once"))]
        elif values == [""]:
            errors[name] = [str(_("must not be empty (leave the parameter out instead)"))]
    return errors


def _from_one(raw: str, name: str) -> int:
    """A whole number from 1, as ASCII digits; a very large one reads as 10**18."""
    digits = raw.lstrip("0")
    if not _WHOLE.fullmatch(raw) or not digits:
        raise ValidationError({name: [_("must be a whole number from 1")]})
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


class Pagination(PageNumberPagination):
    """DRF's page numbers, strictly: ``page`` is a whole number from 1 (a page past the last is a
    404); ``page_size`` (where a view offers it) a whole number from 1, capped at ``max_page_size``.
    Anything else is a 400 naming the parameter, where DRF would answer the first page or the
    default size. (No ``page=last``: the schema says ``page`` is a number.)"""

    last_page_strings = ()

    def get_page_number(self, request: Request, paginator: Any) -> int:
        raw = query_value(request, self.page_query_param)
        return 1 if raw is None else _from_one(raw, self.page_query_param)  # past the last page: a 404

    def get_page_size(self, request: Request) -> int | None:
        raw = query_value(request, self.page_size_query_param) if self.page_size_query_param else None
        if raw is None:
            return self.page_size
        size = _from_one(raw, self.page_size_query_param)
        return min(size, self.max_page_size) if self.max_page_size else size

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
            if parameter["name"] == self.page_query_param:
                parameter["description"] = "A page number, from 1 (a page past the last is a 404)."
            elif self.max_page_size:
                parameter["description"] = (f"Results a page (default {self.page_size}; a larger number gives "
                                             f"{self.max_page_size}).")
        return parameters


class KeysFirst:
    """An ordered queryset as a paginator (Django's or DRF's) counts and slices it, fast when it is
    deep: a slice reads the page's primary keys first (``SELECT id … ORDER BY … OFFSET n LIMIT k``,
    an index-only scan where an index covers the filter and the order), then only those rows, with
    the queryset's ``select_related`` and ``prefetch_related``. A plain ``OFFSET`` over the full
    rows reads (and throws away) every row before the page from the table.

    Two queries a slice, whatever its depth; ``count()`` is the queryset's own (index-only too)."""

    def __init__(self, queryset: QuerySet[Any]) -> None:
        self.queryset = queryset

    def count(self) -> int:
        return self.queryset.count()

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, key: slice) -> list[Any]:
        if not isinstance(key, slice):
            raise TypeError("KeysFirst takes slices only")
        keys = list(self.queryset.prefetch_related(None).values_list("pk", flat=True)[key])
        if not keys:
            return []
        # The rows by key (no ORDER BY, no OFFSET: the planner reads the primary key index), then
        # in the keys' order.
        rows = {row.pk: row for row in self.queryset.order_by().filter(pk__in=keys)}
        return [rows[k] for k in keys if k in rows]


class FilterSet(django_filters.FilterSet):
    """A django-filter ``FilterSet`` that refuses a filter given twice or empty (a 400 naming it);
    django-filter would apply the last value, or ignore an empty one."""

    def is_valid(self) -> bool:
        valid = super().is_valid()
        errors = _repeated_or_empty(self.data, self.filters)
        for name, messages in errors.items():
            if name in self.form.errors:
                continue
            for message in messages:
                self.form.add_error(name, message)
        return valid and not errors


class SearchFilter(filters.SearchFilter):
    """DRF's search, given once, without NUL (DRF refuses it with a bare list that names nothing)."""

    def get_search_terms(self, request: Request) -> list[str]:
        value = query_value(request, self.search_param)
        if value and "\x00" in value:
            raise ValidationError({self.search_param: [_("must not contain NUL characters")]})
        return super().get_search_terms(request)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["pattern"] = "^[^\\x00]*$"
        return parameters


class OrderingFilter(filters.OrderingFilter):
    def get_ordering(self, request: Request, queryset: Any, view: Any) -> Any:
        query_value(request, self.ordering_param)
        return super().get_ordering(request, queryset, view)


class QuerySerializer(serializers.Serializer):
    """Validates query parameters. A parameter given twice or empty is an error naming it (DRF
    would read the last value, or take the default for an empty one)."""

    def to_internal_value(self, data: Any) -> Any:
        errors = _repeated_or_empty(data, self.fields)
        if errors:
            raise ValidationError(errors)
        return super().to_internal_value(data)
