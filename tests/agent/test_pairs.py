"""
Candidate pairs: learning, ranking, and what birthday guesses count for.
"""

from __future__ import annotations

from punchd.agent.pairs import MAX_PEER_REFLEXIVE, Pairs
from punchd.wire import Candidate, CandidateKind


def test_birthday_guesses_do_not_use_up_peer_reflexive_learning() -> None:
    pairs = Pairs()
    for port in range(2000, 2100):
        pairs.add(0, Candidate(CandidateKind.PRFLX, "203.0.113.5", port), guess=True)
    assert pairs.queue == []  # guesses are probed by their sprayer, not queued
    learned = [pairs.learn(0, ("203.0.113.5", 40000 + i)) for i in range(MAX_PEER_REFLEXIVE)]
    assert all(p is not None for p in learned)
    assert pairs.learn(0, ("203.0.113.5", 50000)) is None  # the cap still holds


def test_the_explanation_sums_up_guesses() -> None:
    pairs = Pairs()
    pairs.add(0, Candidate(CandidateKind.SRFLX, "203.0.113.5", 4000))
    for port in range(2000, 2300):
        pairs.add(0, Candidate(CandidateKind.PRFLX, "203.0.113.5", port), guess=True)
    text = pairs.explain("bob")
    assert "srflx 203.0.113.5:4000: 0 checks, silent" in text
    assert "300 birthday probes to random ports, none answered" in text
    assert text.count("203.0.113.5") == 1
