"""The seat login's menu choices against a real service and the local session store
(api/seat_login.py; issue 16): a student's session comes with its save points and the
choice that starts it over; going back to a save point (by its number, not a label that
looks like one) or to the template, then starting on the seat; what labmetal refuses: a
session busy on a seat, another student's session, a choice that is not one.

Slow: a service with its iSCSI target server (tests/test_sessions.py). The screen's side is
tests/test_seat_login_menu.py."""
from __future__ import annotations

from tests.test_seat_login import MAC, lab  # noqa: F401 (fixture)
from tests.test_sessions import (PASSWORDS, TEMPLATE_BYTE, Lab, auth,  # noqa: F401 (fixtures)
                                 make_lab, storage_tools)

LOGIN = f"/v1/seat-login/{MAC.replace(':', '-')}"


def test_a_student_goes_back_to_a_save_point_or_to_the_template_from_the_seat(lab: Lab):  # noqa: F811
    ses = lab.ok("sam", "POST", "/v1/sessions", {"template": "tp-login"}, status=201)
    uuid = ses["uuid"]
    for label in ("first", "1"):  # save 2 is labelled "1"
        lab.ok("sam", "POST", f"/v1/sessions/{uuid}/save", {"label": label}, status=201)

    menu = lab.ok("sam", "POST", LOGIN, {})
    (mine,) = menu["choices"]
    assert mine["choice"] == f"s-{uuid}" and mine["kind"] == "resume"
    assert mine["reset"] == f"r-{uuid}" and menu["left_off"] == 0
    assert [(s["choice"], s["label"]) for s in mine["saves"]] == \
        [(f"v-{uuid}-2", "1"), (f"v-{uuid}-1", "first")]

    started = lab.ok("sam", "POST", f"{LOGIN}/start",
                     {"choice": f"v-{uuid}-1", "ticket": menu["ticket"]})
    assert started["session"] == uuid and started["student"] == "sam"
    shown = lab.ok("sam", "GET", f"/v1/sessions/{uuid}")
    assert shown["state"] == "running" and shown["seat"] == "a01"

    for choice, status, told in (
            (f"r-{uuid}", 409, "cannot be reset"),  # busy on a01: the door's refusal
            (f"v-{uuid}-2", 409, "cannot be reverted"),
            (f"v-{uuid}-x", 400, "choice"),
            (f"r-{uuid}-1", 400, "not a choice of this menu")):
        refused = lab.call("sam", "POST", f"{LOGIN}/start",
                           {"choice": choice, "ticket": menu["ticket"]})
        assert refused.status_code == status and told in refused.text, (choice, refused.text)
    una = lab.ok("una", "POST", LOGIN, {})
    refused = lab.call("una", "POST", f"{LOGIN}/start",
                       {"choice": f"r-{uuid}", "ticket": una["ticket"]})
    assert refused.status_code == 404 and "could not be found" in refused.text
    assert len(lab.ok("sam", "GET", f"/v1/sessions/{uuid}/saves")["saves"]) == 2

    lab.ok("sam", "POST", f"/v1/sessions/{uuid}/stop")
    lab.ok("sam", "POST", f"{LOGIN}/start", {"choice": f"r-{uuid}", "ticket": menu["ticket"]})
    assert lab.ok("sam", "GET", f"/v1/sessions/{uuid}/saves")["saves"] == []
    assert lab.ok("sam", "GET", f"/v1/sessions/{uuid}")["state"] == "running"
    lab.ok("sam", "POST", f"/v1/sessions/{uuid}/stop")
