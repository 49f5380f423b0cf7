"""The controller's pure helpers."""

from __future__ import annotations

import pytest

from shoal.control import gist

# two refusals with one gist are noted once: measured numbers move every tick, the rest does not
SAME = {
    "rtt_moves": (
        "preflight: a -> b at 10.0.0.2 (ethernet, RTT 5.3 ms, loss 0%): RTT 5.3 ms is over",
        "preflight: a -> b at 10.0.0.2 (ethernet, RTT 6.1 ms, loss 10%): RTT 6.1 ms is over",
    ),
    "memory_moves": (
        "node a has 1.2 GiB available, needs 3.0 GiB",
        "node a has 1.4 GiB available, needs 3.0 GiB",
    ),
}
DIFFERENT = {
    "another_address": ("path at 10.0.0.2 is down", "path at 10.0.0.3 is down"),
    "another_count": ("needs >= 2 nodes, 1 alive", "needs >= 3 nodes, 1 alive"),
    "another_reason": ("no alive node holds m", "m is blocked by its model card"),
}


@pytest.mark.parametrize(("a", "b"), SAME.values(), ids=SAME)
def test_refusals_that_differ_only_in_measurements_share_a_gist(a: str, b: str) -> None:
    assert gist(a) == gist(b)


@pytest.mark.parametrize(("a", "b"), DIFFERENT.values(), ids=DIFFERENT)
def test_refusals_that_say_something_new_do_not(a: str, b: str) -> None:
    assert gist(a) != gist(b)
