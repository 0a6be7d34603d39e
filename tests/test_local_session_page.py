"""The sessions page for a local session (issue 16), in Chromium: the panel says the session
runs from the seat's disk and when it was last synced; a save while it runs is queued and
made from the seat's upload; a stop shows the session syncing until its seat has uploaded.

The service and the seat are tests/test_local_sessions.py's (the local store; the seat's
ramdisk is the agent's session code in this process); tests/test_local_session_boots.py
runs the same ends on QEMU seats booting the built ramdisk.
"""
from __future__ import annotations

import pytest

from tests.test_local_sessions import Seat, chunk, lab, tp_image  # noqa: F401 (fixtures)
from tests.test_pages import browser, find, log_in, shot, wait  # noqa: F401 (fixture)
from tests.test_sessions import PASSWORDS, make_lab  # noqa: F401 (fixture)

MiB = 2**20
SAM = ("sam", PASSWORDS["sam"])


def facts(driver) -> dict[str, str]:
    """The panel's facts, name -> value."""
    pairs = driver.execute_script(  # in one read: the panel re-renders as it polls
        "return [...document.querySelectorAll('#facts dt')]"
        ".map((dt) => [dt.textContent, dt.nextElementSibling.textContent]);")
    return dict(pairs)


@pytest.mark.parametrize("lab", ["local"], indirect=True)
def test_a_local_sessions_panel_shows_where_it_runs_its_queued_save_and_its_sync(
        lab, browser, tmp_path):  # noqa: F811
    a01 = Seat(lab, "a01", tmp_path)
    ses = lab.ok("ada", "POST", "/v1/sessions", {"template": "reseaux", "student": "sam"},
                 status=201)
    uuid, path = ses["uuid"], f"/v1/sessions/{ses['uuid']}"
    lab.ok("sam", "POST", f"{path}/start", {"seat": "a01", "boot": False})

    log_in(browser, lab.service, SAM)
    wait(browser, lambda d: d.find_elements("css selector", f'[data-open="{uuid}"]'),
         what="sam's session")
    find(browser, f'[data-open="{uuid}"]').click()
    wait(browser, lambda d: facts(d).get("State") == "starting", what="the panel")
    assert facts(browser)["Runs"] == "from the seat's disk (synced to your store when it ends)"
    assert facts(browser)["Last synced"] == "never"

    # the seat's ramdisk puts it on the disk: it runs
    a01.ramdisk()
    wait(browser, lambda d: facts(d).get("State") == "running", what="running")
    a01.os_writes({8 * MiB: chunk("sam's routes")})

    # a save while it runs is queued: the newest state is on the seat
    find(browser, "#label").send_keys("before firewall")
    find(browser, "#save button").click()
    wait(browser, lambda d: 'Save "before firewall" queued' in find(d, "#flash").text,
         what="the queued save")
    assert "error" not in find(browser, "#flash").get_attribute("class")
    assert lab.ok("sam", "GET", f"{path}/saves")["saves"] == []

    # stop: syncing until the seat has uploaded it, then stopped, synced, saved
    find(browser, "#stop").click()
    wait(browser, lambda d: "is ending: its seat uploads it to your store" in
         find(d, "#flash").text, what="the stop's message")
    wait(browser, lambda d: facts(d).get("State", "").startswith("syncing: its seat is "
                                                                 "uploading it"),
         what="syncing")
    shot(browser, "sessions-local-syncing")
    a01.ramdisk()
    wait(browser, lambda d: facts(d).get("State") == "stopped"
         and facts(d).get("Last synced") != "never", what="stopped and synced")
    wait(browser, lambda d: "before firewall" in find(d, "#saves").text,
         what="the save point made from the upload")
    assert lab.ok("sam", "GET", path)["synced_at"]
    shot(browser, "sessions-local")
