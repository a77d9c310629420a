"""
The deterministic slice of the fuzz campaign (see L{fuzz}): every checked-in
corpus file and a few thousand seeded mutations through each target, without
atheris.  C{make fuzz} runs the coverage-guided campaign.
"""

from __future__ import annotations

import hashlib

import pytest
from twisted.logger import Logger

from fuzz.harness import Crash, corpus_files, load, no_logged_failures, run_slice, target_names

MUTATIONS = 2000


def test_every_target_is_found() -> None:
    assert set(target_names()) >= {
        "control_lines",
        "rendezvous_client",
        "rendezvous_server",
        "stun_codec",
    }


@pytest.mark.parametrize("name", target_names())
def test_the_corpus_holds_the_current_seeds(name: str) -> None:
    target = load(name)
    on_disk = {path.name: path.read_bytes() for path in corpus_files(target)}
    seeds = {hashlib.sha1(seed).hexdigest()[:16]: seed for seed in target.seeds()}
    assert seeds, "a target needs seeds"
    assert on_disk == seeds, "run: python -m fuzz.make_corpus " + name


@pytest.mark.parametrize("name", target_names())
def test_the_deterministic_slice(name: str) -> None:
    target = load(name)
    assert run_slice(target, MUTATIONS) == MUTATIONS + len(corpus_files(target))


def test_a_caught_and_logged_failure_is_a_crash() -> None:
    with pytest.raises(Crash, match="ZeroDivisionError"), no_logged_failures():
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            Logger().failure("the daemon caught it")
