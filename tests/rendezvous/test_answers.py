"""
RecentAnswers: what a retransmitted request gets back, and for how long.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from punchd.rendezvous.answers import RECENT_ANSWER_SECONDS, RECENT_ANSWERS, RecentAnswers

ADDRESS = ("192.0.2.1", 4000)


def tid(i: int) -> bytes:
    return i.to_bytes(12, "big")


def test_lookup_by_agent_and_transaction() -> None:
    answers = RecentAnswers(Clock())
    answers.remember("alice", tid(1), ADDRESS, b"one")
    answers.remember("bob", tid(1), ADDRESS, b"other")
    found = answers.lookup("alice", tid(1))
    assert found is not None and found.data == b"one"
    assert answers.lookup("alice", tid(2)) is None
    assert answers.agents() == {"alice", "bob"}


def test_each_agent_keeps_its_last_answers() -> None:
    answers = RecentAnswers(Clock())
    for i in range(RECENT_ANSWERS + 5):
        answers.remember("alice", tid(i), ADDRESS, b"%d" % i)
    answers.remember("bob", tid(0), ADDRESS, b"bob's")
    assert answers.lookup("alice", tid(4)) is None
    assert answers.lookup("alice", tid(5)) is not None
    assert answers.lookup("bob", tid(0)) is not None
    assert len(answers) == RECENT_ANSWERS + 1


def test_expire_drops_old_answers_only() -> None:
    clock = Clock()
    answers = RecentAnswers(clock)
    answers.remember("alice", tid(1), ADDRESS, b"old")
    answers.remember("bob", tid(1), ADDRESS, b"old")
    clock.advance(RECENT_ANSWER_SECONDS / 2)
    answers.remember("alice", tid(2), ADDRESS, b"new")
    answers.remember("alice", tid(1), ADDRESS, b"again")  # remembered anew: new again
    clock.advance(RECENT_ANSWER_SECONDS / 2 + 1)
    answers.expire()
    assert answers.agents() == {"alice"}
    assert answers.lookup("bob", tid(1)) is None
    again = answers.lookup("alice", tid(1))
    assert again is not None and again.data == b"again"
    clock.advance(RECENT_ANSWER_SECONDS)
    answers.expire()
    assert len(answers) == 0 and answers.agents() == set()


def test_forget() -> None:
    answers = RecentAnswers(Clock())
    answers.remember("alice", tid(1), ADDRESS, b"x")
    answers.remember("alice", tid(2), ADDRESS, b"y")
    answers.remember("bob", tid(1), ADDRESS, b"z")
    answers.forget("alice")
    answers.forget("carol")
    assert len(answers) == 1 and answers.agents() == {"bob"}
