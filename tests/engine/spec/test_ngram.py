from __future__ import annotations

from duoserve.engine.spec.ngram import NgramProposer


def test_proposes_what_followed_the_latest_earlier_occurrence():
    proposer = NgramProposer(ngram_min=1, ngram_max=3)
    # "7 8" occurs twice before the end; the latest one was followed by 9 4.
    assert proposer.lookup([7, 8, 1, 2, 7, 8, 9, 4, 5, 7, 8], 2) == [9, 4]
    assert proposer.lookup([7, 8, 1, 2, 7, 8, 9, 4, 5, 7, 8], 5) == [9, 4, 5, 7, 8]


def test_prefers_the_longest_match():
    proposer = NgramProposer(ngram_min=1, ngram_max=3)
    # The 1-gram "3" last occurred before 6, but the 3-gram "1 2 3" before 4.
    assert proposer.lookup([1, 2, 3, 4, 5, 3, 6, 1, 2, 3], 1) == [4]


def test_nothing_without_a_match_of_at_least_ngram_min():
    proposer = NgramProposer(ngram_min=2, ngram_max=4)
    assert proposer.lookup([1, 2, 3, 4, 5, 3], 3) == []  # only the 1-gram "3" recurs
    assert proposer.lookup([4], 3) == []
    # Near the end there are fewer than k tokens to propose.
    assert proposer.lookup([5, 6, 5, 6], 4) == [5, 6]
