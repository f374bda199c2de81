"""Test lanes. `make test` (and CI) runs every test; `make test-fast`, the everyday loop, leaves out the lanes
below. A test that starts a server, Prometheus or a Docker engine without its lane's marker fails at that moment
(`require`, called by the helpers that start them), so the fast lane cannot start one by mistake and the markers
cannot drift from what the tests do."""

from __future__ import annotations

LANES = {
    "server": "starts `reskd serve` (a process or an in-process uvicorn) on loopback",
    "prometheus": "starts a real Prometheus that scrapes a server",
    "docker": "builds or runs the image on a Docker engine",
    "rehearsal": "trains: the bundled sweeps with their tiny schedules, the device rehearsals",
    "soak": "holds a server under overload or long traffic",
}
FAST = "not (" + " or ".join(LANES) + ")"

current = None  # the pytest item being set up or run (tests/conftest.py keeps it)
collected: dict[str, set[str]] = {}  # every test this session collected -> its markers (tests/conftest.py)


class LaneError(AssertionError):
    pass


def require(marker: str, what: str) -> None:
    """Fail the running test unless it carries `marker`."""
    item = current
    if item is not None and item.get_closest_marker(marker) is None:
        raise LaneError(f"{item.nodeid} starts {what} but is not marked `{marker}`: add "
                        f"`pytestmark = pytest.mark.{marker}` to its module or @pytest.mark.{marker} to it, so "
                        f"`make test-fast` leaves it out (tests/lanes.py)")
