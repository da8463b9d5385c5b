"""Placeholder, being written in this session."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._app import Server


def add_routes(server: Server) -> None:
    pass
