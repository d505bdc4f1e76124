"""Peer bans: exponential backoff, cap, reset on success, expiry by ``now``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.client.bans import BanList
from distllm.identity import Identity

A = Identity.from_seed(b"\x01" * 32).peer_id
B = Identity.from_seed(b"\x02" * 32).peer_id


def test_backoff_doubles_up_to_the_cap() -> None:
    bans = BanList(base=1.0, cap=10.0)
    now = 0.0
    durations = []
    for _ in range(6):
        durations.append(bans.ban(A, now))
        now += durations[-1]  # fails again right after the ban ends
    assert durations == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert bans.failures(A) == 6


def test_ban_expires_with_now() -> None:
    bans = BanList(base=2.0)
    bans.ban(A, 100.0)
    assert bans.is_banned(A, 100.0)
    assert bans.is_banned(A, 101.9)
    assert not bans.is_banned(A, 102.0)
    assert not bans.is_banned(B, 100.0)
    assert bans.banned(101.0) == {A}
    assert bans.banned(102.0) == set()


def test_success_resets_the_backoff_but_not_a_running_ban() -> None:
    bans = BanList()
    bans.ban(A, 0.0)
    bans.ban(A, 1.0)  # 2 s: until 3.0
    bans.on_success(A)  # a reply to a request sent before the failure
    assert bans.is_banned(A, 2.0)
    assert bans.failures(A) == 0
    assert bans.ban(A, 3.0) == 1.0  # afresh
    bans.on_success(B)  # unknown peer: nothing to do
    assert bans.failures(B) == 0


def test_failures_during_a_ban_do_not_escalate() -> None:
    bans = BanList()
    assert bans.ban(A, 0.0) == 1.0
    assert bans.ban(A, 0.5) == 0.5  # another request hit the same outage
    assert bans.failures(A) == 1
    assert bans.ban(A, 1.0) == 2.0


def test_at_least_lengthens_a_ban() -> None:
    bans = BanList()
    assert bans.ban(A, 0.0, at_least=5.0) == 5.0  # e.g. Busy(retry_after=5)
    assert bans.ban(A, 1.0, at_least=7.0) == 7.0  # during the ban: extended, not escalated
    assert bans.is_banned(A, 7.9)
    assert bans.failures(A) == 1
    with pytest.raises(ValueError, match="at_least"):
        bans.ban(B, 0.0, at_least=-1.0)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="base"):
        BanList(base=-1.0)
    with pytest.raises(ValueError, match="factor"):
        BanList(factor=0.5)
    with pytest.raises(ValueError, match="cap"):
        BanList(base=5.0, cap=1.0)
    with pytest.raises(ValueError, match="cap"):
        BanList(cap=float("inf"))


@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["fail", "success"]), st.floats(0.0, 50.0)), max_size=40
    ),
    base=st.floats(0.1, 5.0),
    factor=st.floats(1.0, 4.0),
)
@settings(max_examples=200, deadline=None)
def test_backoff_model(ops: list[tuple[str, float]], base: float, factor: float) -> None:
    """Against a plain model: k-th consecutive failure outside a ban -> min(base·f^(k-1), cap)."""
    cap = 30.0
    bans = BanList(base=base, factor=factor, cap=cap)
    now, k, until = 0.0, 0, -1.0
    for op, wait in ops:
        now += wait
        if op == "success":
            bans.on_success(A)
            k = 0
        elif now < until:
            assert bans.ban(A, now) == pytest.approx(until - now)
        else:
            k += 1
            expected = min(base * factor ** (k - 1), cap)
            assert bans.ban(A, now) == pytest.approx(expected)
            until = now + expected
        assert bans.is_banned(A, now) == (now < until)
        assert bans.banned(now) == ({A} if now < until else set())
        assert bans.failures(A) == k


def test_many_failures_stay_at_the_cap() -> None:
    bans = BanList(factor=1e10, cap=60.0)
    now = 0.0
    for _ in range(100):
        now += bans.ban(A, now)
    assert bans.ban(A, now) == 60.0
