"""The interface every proposer implements."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from duoserve.engine.request import Request


class Proposer(Protocol):
    def propose(self, requests: Sequence[Request], num_drafts: Sequence[int]) -> list[list[int]]:
        """Up to num_drafts[i] draft tokens to follow each request's tokens (fewer, or none, allowed)."""
        ...

    def retain(self, request_ids: Collection[str]) -> None:
        """Drop whatever is kept for requests not among request_ids (they finished)."""
        ...
