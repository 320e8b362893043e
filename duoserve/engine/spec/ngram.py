"""N-gram prompt lookup: propose what followed the last n tokens where they occurred before.

Matches the request's last n tokens (n from ngram_max down to ngram_min, longest first) against
its prompt and output so far, and proposes the tokens that followed the latest earlier occurrence.
Strong on input-grounded tasks (summarise, edit, quote, code changes), where the output copies
spans of the input; it costs no model, and a request without a match simply proposes nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from duoserve.engine.request import Request


class NgramProposer:
    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def propose(self, requests: Sequence[Request], num_drafts: Sequence[int]) -> list[list[int]]:
        return [self.lookup(r.all_token_ids, k) for r, k in zip(requests, num_drafts, strict=True)]

    def retain(self, request_ids: Collection[str]) -> None:
        pass  # stateless

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        tokens = np.asarray(token_ids)
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            # Windows of n tokens that end before the last token, so each has a successor.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return token_ids[start : start + k]
        return []
