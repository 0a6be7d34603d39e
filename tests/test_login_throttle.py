"""The login throttle alone, on a fake clock: it backs off, forgives a right password and
stays bounded (through a real service: tests/test_hostile_api.py)."""
from __future__ import annotations

import pytest

from labmetal.api.auth import Backoff, LoginThrottle, Throttled

pytestmark = pytest.mark.fast


def test_the_login_throttle_backs_off_forgives_a_right_password_and_stays_bounded():
    now = [1000.0]
    throttle = LoginThrottle(per_user=Backoff(free=3, first=1, longest=8),
                             per_address=Backoff(free=10, first=1, longest=8),
                             capacity=50, clock=lambda: now[0])

    def attempt(name: str, right: bool, address: str = "10.0.0.7") -> None:
        throttle.admit(name, address)
        throttle.finish(name, address, failed=not right)

    for _ in range(3):
        attempt("sue", right=False)
    waits = []
    for _ in range(5):  # each failure past the free ones doubles the wait, up to 8 s
        with pytest.raises(Throttled) as refused:
            attempt("sue", right=True)
        waits.append(refused.value.retry_after)
        now[0] += refused.value.retry_after
        attempt("sue", right=False)
    assert waits == [1, 2, 4, 8, 8]
    now[0] += 8
    attempt("sue", right=True)  # the right password: sue's count starts again
    for _ in range(2):
        attempt("sue", right=False)
    throttle.check("sue", "10.0.0.8")  # two failures are free again

    # the address kept its count: 3 + 5 + 2 failures, the tenth makes it wait
    with pytest.raises(Throttled, match="from 10.0.0.7"):
        attempt("una", right=True)

    # guesses sent at once are not all let through before the first has failed
    for _ in range(3):
        throttle.admit("tom", "10.0.0.9")
    with pytest.raises(Throttled):
        throttle.admit("tom", "10.0.0.9")

    # cycling through names from many addresses: the memory stays bounded
    for n in range(5000):
        attempt(f"name{n}", right=False, address=f"10.1.{n // 250}.{n % 250}")
    assert all(len(table) <= 50 for table in throttle._strikes.values())

