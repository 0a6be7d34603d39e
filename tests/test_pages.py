"""The web pages, in a real headless Chromium against a real service: each role logs in
through the login page and finds its pages with real data (the admin's nodes, images, users
and conductors, the teacher's room grid, the student's sessions), a teacher deploys a
simulated room of light seats (real agents, disks and BMCs) and watches its seats reach done,
a student is refused admin pages and data, a student resumes, saves, reverts and resets a
session of a TP template (local overlay store, as tests/test_sessions.py), a request without the
CSRF token is refused, an
idle session goes back to the login page even while its page polls. Screenshots of every
page land in /tmp/labmetal-pages/."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from labmetal.lab.network import Lab
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from labmetal.lab.light_room import BMC_PASSWORD, MIB, make_whole_disk, open_room, sha256_of
from labmetal.lab.harness import LABMETAL, Processes, free_port, start_service
from tests.test_sessions import our_processes

SHOTS = Path("/tmp/labmetal-pages")
ADA = ("ada", "ada's long pass phrase")
TOM = ("tom", "tom's long pass phrase")
SUE = ("sue", "sue's long pass phrase")
CSV = """seat,name,mac,driver
A01,tpr2-a01,52:54:00:aa:00:01,wol
A02,tpr2-a02,52:54:00:aa:00:02,wol
A03,tpr2-a03,52:54:00:aa:00:03,wol
B01,tpr2-b01,52:54:00:aa:00:04,wol
"""


def chromium() -> webdriver.Chrome:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("chromium and chromedriver are missing (./dev.sh setup installs them)")
    options = Options()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--lang=en-GB", "--disable-gpu"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=ChromeService(executable_path=driver))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One service (http_basic) with an admin, a teacher and a student."""
    procs = Processes(tmp_path_factory.mktemp("pages"))
    state_dir = procs.workdir / "pages-state"
    subprocess.run([LABMETAL, "user", "set", ADA[0], "--role", "admin", "--password-stdin",
                    "--state-dir", str(state_dir)], input=ADA[1] + "\n", check=True,
                   capture_output=True, text=True)
    service = start_service(procs, "pages", auth="http_basic", state_dir=state_dir)
    for (name, password), role in ((TOM, "teacher"), (SUE, "student")):
        created = service.post("/v1/users", {"name": name, "role": role, "password": password},
                               auth=ADA)
        assert created.status_code == 201, created.text
    yield service
    procs.stop_all()


@pytest.fixture
def browser():
    driver = chromium()
    yield driver
    driver.quit()


# -- helpers -----------------------------------------------------------------------------
def wait(driver, condition, timeout: float = 15, what: str = "the page"):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
            lambda d: condition(d))
    except TimeoutException:
        shot(driver, "failed")
        raise AssertionError(f"timed out waiting for {what}; at {driver.current_url}") from None


def find(driver, css: str):
    return driver.find_element(By.CSS_SELECTOR, css)


def texts(driver, css: str) -> list[str]:
    return [element.text for element in driver.find_elements(By.CSS_SELECTOR, css)]


def path_of(driver) -> str:
    parts = urlsplit(driver.current_url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def shot(driver, name: str) -> None:
    """A screenshot of the whole page (the viewport grown to the page's height)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 3  # progress bars slide: shoot where they stop
    while time.monotonic() < deadline and not driver.execute_script(
            "return document.getAnimations().every((a) => a.playState !== 'running')"):
        time.sleep(0.1)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": max(600, min(height, 3000)), "deviceScaleFactor": 1,
        "mobile": False})
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def log_in(driver, service, user: tuple[str, str], next_page: str = "") -> None:
    driver.get(service.url + "/login" + (f"?next={next_page}" if next_page else ""))
    find(driver, "#user").send_keys(user[0])
    find(driver, "#password").send_keys(user[1])
    find(driver, "#login button[type=submit]").click()
    wait(driver, lambda d: urlsplit(d.current_url).path.startswith("/ui/"), what="the login")


def fetch(driver, method: str, path: str, csrf: bool = True) -> dict:
    """A request from the page's own JavaScript, with the login cookie."""
    return driver.execute_async_script("""
        const [method, path, csrf, done] = arguments;
        const headers = {"X-Requested-With": "XMLHttpRequest", "Content-Type": "application/json"};
        if (csrf)
          headers["X-CSRF-Token"] = document.querySelector('meta[name="csrf-token"]').content;
        fetch(path, {method, headers, body: method === "GET" ? undefined : "{}"})
          .then(async (r) => done({status: r.status, text: await r.text(),
                                   challenge: r.headers.get("WWW-Authenticate")}));
    """, method, path, csrf)


def nav(driver) -> list[str]:
    return texts(driver, "header nav a")


def local_users(state_dir: Path, *users: tuple[tuple[str, str], str]) -> None:
    """Accounts made with the CLI before the service starts (the first admin has to be)."""
    for (name, password), role in users:
        subprocess.run([LABMETAL, "user", "set", name, "--role", role, "--password-stdin",
                        "--state-dir", str(state_dir)], input=password + "\n", check=True,
                       capture_output=True, text=True)


def log_out(driver) -> None:
    find(driver, "form.who button[type=submit]").click()
    wait(driver, lambda d: urlsplit(d.current_url).path == "/login", what="the logout")


RECORD_SEATS = """
    // Every state and percentage the seat tiles show, as the page renders them: what the
    // test saw does not depend on when selenium happens to look.
    window.seen = [];
    const note = () => {
      for (const tile of document.querySelectorAll('#seats li')) {
        const badge = tile.querySelector('.badge').textContent;
        const bar = tile.querySelector('.bar').getAttribute('aria-valuenow');
        const entry = `${tile.dataset.label} ${badge} ${bar}`;
        if (window.seen[window.seen.length - 1] !== entry && !window.seen.includes(entry))
          window.seen.push(entry);
      }
    };
    new MutationObserver(note).observe(document.getElementById('seats'),
      {subtree: true, childList: true, characterData: true, attributes: true});
    note();
"""


def upload_image(service, name: str, data: bytes) -> dict:
    image = service.post("/v1/images", {"name": name, "kind": "whole-disk"}, auth=ADA).json()
    uploaded = requests.put(f"{service.url}/v1/images/{image['uuid']}/data", data=data,
                            auth=ADA, timeout=60)
    assert uploaded.ok, uploaded.text
    return uploaded.json()


# -- the stories -------------------------------------------------------------------------
def test_admin_finds_nodes_images_users_and_conductors_with_real_data(lab, browser, tmp_path):
    enrolled = lab.post("/v1/nodes", {"name": "tpr2-z99", "driver": "wol"}, auth=ADA)
    assert enrolled.status_code == 201, enrolled.text
    log_in(browser, lab, ADA)
    assert nav(browser) == ["Rooms", "Nodes", "Images", "Users", "Conductors", "Sessions"]

    # nodes: the enrolled node in the table, its detail page with history and actions
    browser.get(lab.url + "/ui/nodes")
    row = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-key="%s"]'
                                                  % enrolled.json()["uuid"]), what="the node")[0]
    cells = [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")]
    assert cells[0] == "tpr2-z99" and cells[2] == "enroll" and cells[3] == "pages"
    assert texts(browser, "thead th") == ["Name", "Power", "Provision state", "Conductor",
                                          "Last error", "Maintenance"]
    shot(browser, "nodes")
    find(browser, "#filter").send_keys("no-such-node")
    wait(browser, lambda d: find(d, "#count").text.startswith("0 of"), what="the filter")
    find(browser, "#filter").clear()
    find(browser, "#filter").send_keys("z99")
    wait(browser, lambda d: find(d, "#count").text.startswith("1 of"), what="the filter")
    row = find(browser, f'tr[data-key="{enrolled.json()["uuid"]}"]')
    row.find_element(By.LINK_TEXT, "tpr2-z99").click()
    wait(browser, lambda d: "node enrolled with driver 'wol'" in find(d, "#history").text,
         what="the node's history")
    assert find(browser, "h1").text == "Node tpr2-z99"
    manage = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-verb="manage"]'),
                  what="the manage button")[0]
    manage.click()  # a WoL node without a port cannot be managed: the API says why
    wait(browser, lambda d: "error" in find(d, "#flash").get_attribute("class")
         and "Cannot manage" in find(d, "#flash").text, what="the refusal")
    shot(browser, "node")

    # images: upload through the page, see the progress finish and the checksum
    data = os.urandom(3 * 1024 * 1024)
    image_file = tmp_path / "lab-disk.img"
    image_file.write_bytes(data)
    browser.get(lab.url + "/ui/images")
    wait(browser, lambda d: find(d, "#upload-section").is_displayed(), what="the upload form")
    find(browser, "#file").send_keys(str(image_file))
    assert find(browser, "#name").get_attribute("value") == "lab-disk.img"
    find(browser, "#upload-button").click()
    wait(browser, lambda d: "100 %" in find(d, "#progress-text").text
         and "active" in find(d, "#progress-text").text, 60, "the upload")
    assert find(browser, "#progress").get_attribute("value") == "100"
    digest = hashlib.sha256(data).hexdigest()
    assert digest in find(browser, "#progress-text").text
    cell = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'[data-sha256="{digest}"]'),
                what="the checksum in the table")[0]
    row = cell.find_element(By.XPATH, "./ancestor::tr")
    assert row.find_element(By.CSS_SELECTOR, "th").text == "lab-disk.img"
    assert "raw" in row.text and "3.0 MiB" in row.text and "active" in row.text
    shot(browser, "images")

    # users: create one with a role, disable it; the API agrees
    browser.get(lab.url + "/ui/users")
    wait(browser, lambda d: "tom" in find(d, "#users").text, what="the users")
    find(browser, "#new-name").send_keys("carl")
    Select(find(browser, "#new-role")).select_by_value("teacher")
    find(browser, "#new-password").send_keys("carl's long pass phrase")
    find(browser, "#create button").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-key="carl"]'),
         what="the new user")
    assert lab.get("/v1/users/carl", auth=ADA).json()["role"] == "teacher"
    find(browser, '[data-toggle="carl"]').click()
    wait(browser, lambda d: "disabled" in find(d, 'tr[data-key="carl"]').text, what="disabling")
    assert lab.get("/v1/users/carl", auth=ADA).json()["disabled"] is True
    shot(browser, "users")

    # conductors: the service's own, online, with its heartbeat's age
    browser.get(lab.url + "/ui/conductors")
    row = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-key="pages"]'),
               what="the conductor")[0]
    assert "online" in row.text and " s ago" in row.text
    shot(browser, "conductors")


def test_teacher_deploys_a_room_from_its_seat_grid_and_powers_it_off(lab, browser):
    assert lab.post("/v1/rooms", {"name": "tpr2", "description": "TP room, 2nd floor"},
                    auth=ADA).status_code == 201
    imported = requests.post(f"{lab.url}/v1/rooms/tpr2/import", data=CSV, auth=ADA,
                             headers={"Content-Type": "text/csv"}, timeout=30)
    assert imported.json()["created"] == 4, imported.text
    upload_image(lab, "debian12-reseaux", os.urandom(1024 * 1024))

    log_in(browser, lab, TOM)
    assert path_of(browser) == "/ui/rooms"
    assert nav(browser) == ["Rooms", "Nodes", "Images", "Sessions"]
    wait(browser, lambda d: "TP room, 2nd floor" in find(d, "#rooms").text, what="the rooms")
    shot(browser, "rooms")
    wait(browser, lambda d: d.find_elements(By.LINK_TEXT, "tpr2"), what="the room")[0].click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#seats li")) == 4,
         what="the seats")
    wait(browser, lambda d: find(d, "#summary").text == "4 idle", what="the summary")
    assert texts(browser, ".seat-label") == ["A01", "A02", "A03", "B01"]
    assert not find(browser, "#import-section").is_displayed()  # importing is the admins'
    assert find(browser, "#summary").get_attribute("aria-live") == "polite"
    wait(browser, lambda d: "debian12-reseaux" in find(d, "#image").text, what="the images")
    Select(find(browser, "#image")).select_by_value("debian12-reseaux")
    shot(browser, "room-idle")

    # deploy at a time: listed, and cancelled from the page
    find(browser, 'input[name="when"][value="at"]').click()
    find(browser, "#at").send_keys("12312099\t0800AM")
    find(browser, "#deploy button[type=submit]").click()
    scheduled = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#scheduled li"),
                     what="the scheduled job")[0]
    assert "Scheduled: Deploy debian12-reseaux at" in scheduled.text and "2099" in scheduled.text
    shot(browser, "room-scheduled")
    scheduled.find_element(By.CSS_SELECTOR, "button").click()
    browser.switch_to.alert.accept()
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#scheduled li"),
         what="the cancelled schedule")
    find(browser, 'input[name="when"][value="now"]').click()

    # deploy now: the grid follows the job without a reload. These seats are WoL nodes with
    # no PC behind them, so every seat fails, with its error on the tile.
    marker = browser.execute_script("return (window.marker = 'same page')")
    find(browser, "#deploy button[type=submit]").click()
    wait(browser, lambda d: "Deploy debian12-reseaux" in find(d, "#job").text, what="the job")
    wait(browser, lambda d: find(d, "#summary").text == "4 failed", 90, "the seats to fail")
    tile = find(browser, '#seats li[data-label="A02"]')
    assert "failed" in tile.text and tile.find_element(By.CSS_SELECTOR, ".badge").text == "failed"
    error = tile.find_element(By.CSS_SELECTOR, "details")
    error.find_element(By.CSS_SELECTOR, "summary").click()  # the full text, on demand
    seat = [s for s in lab.get("/v1/rooms/tpr2", auth=ADA).json()["seats"]
            if s["label"] == "A02"][0]
    assert seat["error"] and seat["error"] in error.text
    shot(browser, "room-failed")
    assert browser.execute_script("return window.marker") == marker  # never reloaded

    # one seat re-imaged alone (the same job, that seat queued again)
    find(browser, '[data-seat="A02"]').click()
    wait(browser, lambda d: "Seat A02 is queued" in find(d, "#flash").text, what="the retry")
    wait(browser, lambda d: find(d, "#summary").text == "4 failed", 90, "the seat to fail again")

    # the whole room powered off
    find(browser, "#power-off").click()
    browser.switch_to.alert.accept()
    wait(browser, lambda d: "Power off" in find(d, "#job").text, what="the power-off job")
    assert lab.get("/v1/rooms/tpr2", auth=ADA).json()["job"]["action"] == "power-off"
    shot(browser, "room-power-off")

    # the admin imports seats from the page
    browser.delete_all_cookies()
    log_in(browser, lab, ADA, "/ui/rooms/tpr2")
    assert path_of(browser) == "/ui/rooms/tpr2"
    wait(browser, lambda d: find(d, "#import-section").is_displayed(), what="the import form")
    shot(browser, "room-admin")

    # a teacher's page for users is a readable refusal, as the API's
    browser.delete_all_cookies()
    log_in(browser, lab, TOM, "/ui/users")
    assert "not for your role" in find(browser, "main").text
    assert fetch(browser, "GET", "/v1/users")["status"] == 403


@pytest.fixture
def network():
    with Lab() as made:
        yield made


def test_teacher_deploys_a_simulated_room_and_watches_its_seats_reach_done(
        network, procs, tmp_path, browser):
    """Three light seats (real agents in network namespaces, sparse-file disks, virtual
    BMCs): the admin creates the room and imports it by CSV on the pages, the teacher deploys
    it from the grid and follows every seat to done; the seat whose disk is too small fails
    with the reason on its tile, is fixed, re-imaged from its tile and reaches done too."""
    state_dir = tmp_path / "room41-state"
    local_users(state_dir, (ADA, "admin"))
    room = open_room(network, procs, tmp_path, index=41, seats=3, auth="http_basic",
                     state_dir=state_dir)
    plain_api = room.api
    room.api = lambda method, path, **kw: plain_api(method, path, auth=ADA, **kw)
    service = room.service
    assert service.post("/v1/users", {"name": TOM[0], "role": "teacher", "password": TOM[1]},
                        auth=ADA).status_code == 201
    room.upload_deploy_ramdisk()
    (tmp_path / "image").mkdir()
    image = room.upload("debian12-reseaux", "whole-disk",
                        make_whole_disk(tmp_path / "image", size_mib=40))
    csv = tmp_path / "tpr4.csv"
    csv.write_text("seat,name,mac,driver,ipmi_address,ipmi_port,ipmi_username,ipmi_password,"
                   "deploy_kernel,deploy_ramdisk\n" + "".join(
                       f"A{i + 1:02d},{seat.name},{seat.mac},ipmi,127.0.0.1,{seat.bmc_port},"
                       f"admin,{BMC_PASSWORD},deploy-kernel,deploy-ramdisk\n"
                       for i, seat in enumerate(room.seats)))

    # the admin creates the room and imports its seats from the pages
    log_in(browser, service, ADA, "/ui/rooms")
    wait(browser, lambda d: find(d, "#create-section").is_displayed(), what="the room form")
    find(browser, "#room-name").send_keys("TPR-4")
    find(browser, "#room-description").send_keys("TP réseaux, 4th floor")
    find(browser, "#create button[type=submit]").click()
    wait(browser, lambda d: d.find_elements(By.LINK_TEXT, "TPR-4"), what="the new room")[0].click()
    wait(browser, lambda d: find(d, "#empty").is_displayed(), what="the empty room")
    find(browser, "#csv").send_keys(str(csv))
    find(browser, "#import button[type=submit]").click()
    wait(browser, lambda d: find(d, "#import-result").text
         == "Imported: 3 node(s) created, 0 updated.", what="the import")
    wait(browser, lambda d: texts(d, ".seat-label") == ["A01", "A02", "A03"], what="the seats")
    wait(browser, lambda d: find(d, "#summary").text == "3 idle", what="the summary")
    shot(browser, "room41-imported")
    log_out(browser)

    # the teacher deploys; seat A03's disk (16 MiB) cannot hold the 40 MiB image
    small = Path(room.seats[2].disk)
    os.truncate(small, 16 * MIB)
    log_in(browser, service, TOM, "/ui/rooms/TPR-4")
    assert path_of(browser) == "/ui/rooms/TPR-4"
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#seats li")) == 3
         and "debian12-reseaux" in find(d, "#image").text, what="the grid and the images")
    browser.execute_script(RECORD_SEATS)
    marker = browser.execute_script("return (window.marker = 'same page')")
    Select(find(browser, "#image")).select_by_value("debian12-reseaux")
    find(browser, "#retries").clear()
    find(browser, "#retries").send_keys("1")
    find(browser, "#deploy button[type=submit]").click()
    wait(browser, lambda d: "Deploy of debian12-reseaux to every seat started" in find(
        d, "#flash").text,
         what="the deploy")
    busy = ("powering", "booting", "writing", "verifying")
    wait(browser, lambda d: any(state in find(d, "#summary").text for state in busy), 60,
         "a seat at work")
    shot(browser, "room41-deploying")
    wait(browser, lambda d: find(d, "#summary").text == "2 done, 1 failed", 180,
         "two seats done and one failed")
    tile = find(browser, '#seats li[data-label="A03"]')
    assert tile.find_element(By.CSS_SELECTOR, ".badge").text == "failed"
    assert "attempt 2" in tile.text  # retried once, then flagged
    tile.find_element(By.CSS_SELECTOR, "details summary").click()
    assert "the image needs" in tile.find_element(By.CSS_SELECTOR, "details p").text
    for label in ("A01", "A02"):
        done = find(browser, f'#seats li[data-label="{label}"]')
        assert done.find_element(By.CSS_SELECTOR, ".badge").text == "done"
        assert done.find_element(By.CSS_SELECTOR, ".bar").get_attribute("aria-valuenow") == "100"
    assert "failed" in find(browser, "#job").text
    shot(browser, "room41-one-failed")
    for seat in room.seats[:2]:
        assert sha256_of(Path(seat.disk), image["virtual_size"]) == image["raw_sha256"]

    # the seat is fixed (a bigger disk) and re-imaged from its tile
    os.truncate(small, 64 * MIB)
    find(browser, '[data-seat="A03"]').click()
    wait(browser, lambda d: "Seat A03 is queued" in find(d, "#flash").text, what="the retry")
    wait(browser, lambda d: find(d, "#summary").text == "3 done", 180, "every seat done")
    wait(browser, lambda d: ": done" in find(d, "#job").text, 30, "the job done")
    assert not find(browser, '#seats li[data-label="A03"] details').is_displayed()
    shot(browser, "room41-done")
    assert sha256_of(small, image["virtual_size"]) == image["raw_sha256"]
    assert browser.execute_script("return window.marker") == marker  # never reloaded

    # the page showed the seats at work, not just before and after
    seen = browser.execute_script("return window.seen")
    states = {entry.split(" ", 1)[1].rsplit(" ", 1)[0] for entry in seen}
    assert states & set(busy), seen
    percents = {int(entry.rsplit(" ", 1)[1]) for entry in seen if " writing " in entry}
    print(f"seat states shown: {sorted(states)}; writing at {sorted(percents)} %")


def test_student_sees_only_their_sessions_page_and_no_admin_data(lab, browser):
    log_in(browser, lab, SUE)
    assert path_of(browser) == "/ui/sessions"
    assert nav(browser) == ["My sessions"]
    wait(browser, lambda d: find(d, "#empty").is_displayed(), what="the empty list")
    assert "You have no session yet" in find(browser, "#empty").text
    shot(browser, "student-sessions")
    for page in ("nodes", "images", "users", "conductors", "rooms"):
        browser.get(f"{lab.url}/ui/{page}")
        assert "not for your role" in find(browser, "main").text, page
    shot(browser, "student-refused")
    for path in ("/v1/nodes", "/v1/images", "/v1/users", "/v1/rooms"):
        assert fetch(browser, "GET", path)["status"] == 403, path


def test_a_request_without_the_csrf_token_is_refused_and_no_password_dialog_pops(lab, browser):
    log_in(browser, lab, TOM)
    refused = fetch(browser, "POST", "/v1/auth/tokens", csrf=False)
    assert refused["status"] == 403 and "CSRF" in refused["text"]
    assert fetch(browser, "POST", "/v1/auth/tokens")["status"] == 201
    browser.delete_all_cookies()
    anonymous = fetch(browser, "GET", "/v1/nodes")
    assert anonymous["status"] == 401 and anonymous["challenge"] is None  # no Basic dialog
    plain = requests.get(lab.url + "/v1/nodes", timeout=30)  # clients still get the challenge
    assert plain.headers["WWW-Authenticate"] == 'Basic realm="labmetal"'
    # a browser at / gets the pages, a client Ironic's version document
    assert requests.get(lab.url + "/", headers={"Accept": "text/html"}, timeout=30,
                        allow_redirects=False).headers["Location"].endswith("/ui/")
    assert requests.get(lab.url + "/", timeout=30).json()["default_version"]["id"] == "v1"


def test_an_idle_session_ends_even_while_its_page_polls_and_the_login_page_returns(
        procs, browser):
    """The room page refreshes every 2 s, inside the 4 s idle timeout: those timer-driven
    refreshes (X-Labmetal-Background: 1) are checked but not counted as use, so a page left
    open still ends its session; what the user does still keeps it alive."""
    idle = 4
    state_dir = procs.workdir / "idle-state"
    local_users(state_dir, (ADA, "admin"), (TOM, "teacher"))
    service = start_service(procs, "idle", auth="http_basic", state_dir=state_dir,
                            session_idle_timeout=idle)
    assert service.post("/v1/rooms", {"name": "idle"}, auth=ADA).status_code == 201

    # the API: two sessions asking every 0.5 s, one as the user, one as a page's timer
    def session() -> requests.Session:
        made = requests.Session()
        csrf = made.get(service.url + "/v1/auth/session", timeout=30).json()["csrf_token"]
        logged = made.post(service.url + "/login", json={"user": TOM[0], "password": TOM[1]},
                           headers={"X-CSRF-Token": csrf}, timeout=30)
        assert logged.ok, logged.text
        return made
    user, timer = session(), session()
    started = time.monotonic()
    ended = None
    while time.monotonic() - started < idle + 2:
        assert user.get(service.url + "/v1/rooms/idle", timeout=30).status_code == 200
        polled = timer.get(service.url + "/v1/rooms/idle", timeout=30,
                           headers={"X-Labmetal-Background": "1"})
        if ended is None and polled.status_code == 401:
            ended = time.monotonic() - started
        assert polled.status_code == (200 if ended is None else 401)
        time.sleep(0.5)
    assert ended is not None and idle - 1 <= ended <= idle + 1.5, ended

    # the browser: the login page, then the room page left open until its session ends
    browser.get(service.url + "/ui/rooms/idle")
    assert path_of(browser) == "/login?next=/ui/rooms/idle"
    find(browser, "#user").send_keys(TOM[0])
    find(browser, "#password").send_keys("not the password")
    find(browser, "#login button[type=submit]").click()
    wait(browser, lambda d: "Wrong user name or password" in find(d, "#login-error").text,
         what="the refusal")
    shot(browser, "login-refused")
    find(browser, "#password").clear()
    find(browser, "#password").send_keys(TOM[1])
    find(browser, "#login button[type=submit]").click()
    wait(browser, lambda d: path_of(d) == "/ui/rooms/idle", what="the room page")
    opened = time.monotonic()
    polls = "return performance.getEntriesByType('resource').filter((e) => " \
            "e.name.endsWith('/v1/rooms/idle') && e.responseStatus === 200).length"
    wait(browser, lambda d: d.execute_script(polls) >= 2, idle, "the page's refreshes")
    wait(browser, lambda d: path_of(d).startswith("/login?next="), idle + 10, "the login page")
    assert time.monotonic() - opened >= idle - 1.5  # not before the idle timeout
    assert path_of(browser) == "/login?next=%2Fui%2Frooms%2Fidle"
    shot(browser, "login")


def test_a_student_resumes_saves_and_resets_a_session(procs, browser):
    """The sessions page against the local overlay store (qcow2 overlays, tgtd), as
    tests/test_sessions.py starts it: a student creates a session of a template, starts it
    on a seat typed in (a busy seat is refused, naming it), saves, stops, reverts, resets;
    the API agrees after each step; another student does not see it; a teacher sees
    everybody's and may reset; an admin picks the seat from the nodes."""
    una = ("una", "una's long pass phrase")
    state_dir = procs.workdir / "ses-state"
    local_users(state_dir, (ADA, "admin"), (TOM, "teacher"), (SUE, "student"), (una, "student"))
    run_dir = Path(tempfile.mkdtemp(prefix="lm-pg-"))  # short: unix socket paths
    service = start_service(procs, "ses", auth="http_basic", state_dir=state_dir,
                            overlay_backend="local", overlay_run_dir=run_dir,
                            iscsi_portal=f"127.0.0.4:{free_port()}")
    try:
        assert service.post("/v1/rooms", {"name": "tpr8"}, auth=ADA).status_code == 201
        for seat in ("a01", "a02"):  # students start sessions on a room's seats only
            assert service.post("/v1/nodes", {"name": seat, "driver": "wol"},
                                auth=ADA).status_code == 201
            assert service.put(f"/v1/rooms/tpr8/seats/{seat.upper()}", {"node": seat},
                               auth=ADA).ok
        disk = bytes([0x54]) * (8 * MIB) + bytes(8 * MIB)
        image = service.post("/v1/images", {"name": "tp3-v1", "kind": "whole-disk",
                                            "disk_format": "raw"}, auth=ADA)
        assert image.status_code == 201, image.text
        uploaded = requests.put(f"{service.url}/v1/images/tp3-v1/data", data=disk, auth=ADA,
                                timeout=60)
        assert uploaded.ok, uploaded.text
        made = service.post("/v1/templates", {"name": "tp3-reseaux", "image": "tp3-v1",
                                              "description": "TP3 networks"}, auth=TOM)
        assert made.status_code == 201, made.text
        # another student's session runs on a02: that seat is busy
        theirs = service.post("/v1/sessions", {"template": "tp3-reseaux"}, auth=una).json()
        assert service.post(f"/v1/sessions/{theirs['uuid']}/start", {"seat": "a02"},
                            auth=una).json()["state"] == "running"

        def mine() -> list[dict]:
            return service.get("/v1/sessions", auth=SUE).json()["sessions"]

        def flash_says(text: str, error: bool = False):
            wait(browser, lambda d: text in find(d, "#flash").text
                 and ("error" in find(d, "#flash").get_attribute("class")) == error,
                 what=f"the message {text!r}")

        def accept_confirm() -> str:
            alert = WebDriverWait(browser, 10).until(lambda d: d.switch_to.alert)
            question = alert.text
            alert.accept()
            return question

        # create: the template select, then the open session's panel
        log_in(browser, service, SUE)
        assert path_of(browser) == "/ui/sessions"
        wait(browser, lambda d: "tp3-reseaux (version 1)" in find(d, "#template").text,
             what="the templates")
        assert find(browser, "label[for=template]").text == "Template"
        find(browser, "#create button").click()
        flash_says("Session of tp3-reseaux version 1 created")
        [ses] = mine()
        assert (ses["template"], ses["template_version"], ses["state"]) == \
            ("tp3-reseaux", 1, "stopped")
        uuid = ses["uuid"]
        path = f"/v1/sessions/{uuid}"
        row = f'tr[data-key="{uuid}"]'
        wait(browser, lambda d: find(d, "#panel").is_displayed()
             and d.switch_to.active_element == find(d, "#panel-h"), what="the panel, focused")
        assert find(browser, "#panel-h").text == "Session tp3-reseaux v1"
        assert texts(browser, "table.data thead th")[:5] == ["Template", "State", "Seat",
                                                             "Last saved", "Used"]
        assert "never" in find(browser, row).text

        # start: the busy seat is refused naming it, a02 stays theirs; a01 runs
        assert "name" in find(browser, "#seat-help").text  # a text field: no node list
        find(browser, "#seat").send_keys("a02")
        find(browser, "#start button").click()
        flash_says("Conflict: Seat a02 is in use by another session", error=True)
        assert find(browser, "#flash").get_attribute("role") == "alert"
        assert mine()[0]["state"] == "stopped"
        find(browser, "#seat").clear()
        find(browser, "#seat").send_keys("a01")
        find(browser, "#start button").click()
        flash_says("is running on seat a01")
        running = service.get(path, auth=SUE).json()
        assert (running["state"], running["seat"]) == ("running", "a01")
        wait(browser, lambda d: "running" in find(d, row).text and "a01" in find(d, row).text,
             what="the running row")
        assert browser.switch_to.active_element == find(browser, "#stop")
        assert find(browser, "#reset").get_attribute("disabled") is not None

        # save with a label: in the save points, last saved in the row
        find(browser, "#label").send_keys("exercise 1")
        find(browser, "#save button").click()
        flash_says('Saved as "exercise 1"')
        saves = service.get(f"{path}/saves", auth=SUE).json()["saves"]
        assert [(s["number"], s["label"]) for s in saves] == [(1, "exercise 1")]
        assert service.get(path, auth=SUE).json()["last_saved_at"]
        wait(browser, lambda d: "exercise 1" in find(d, "#saves").text, what="the save point")
        wait(browser, lambda d: "never" not in find(d, row).text, what="last saved")
        shot(browser, "sessions-running")

        # stop: the data stays, the seat is free
        find(browser, "#stop").click()
        flash_says("stopped; its data stays")
        stopped = service.get(path, auth=SUE).json()
        assert (stopped["state"], stopped["seat"]) == ("stopped", None)
        wait(browser, lambda d: "stopped" in find(d, row).text, what="the stopped row")

        # revert to the save (confirmed)
        wait(browser, lambda d: find(d, f'[data-revert="{saves[0]["uuid"]}"]').is_enabled(),
             what="the revert button")
        find(browser, f'[data-revert="{saves[0]["uuid"]}"]').click()
        assert "exercise 1" in accept_confirm()
        flash_says('reverted to save "exercise 1"')
        log = (procs.workdir / "ses.service.log").read_text()
        assert f"session {uuid} reverted to" in log
        assert service.get(path, auth=SUE).json()["state"] == "stopped"

        # reset to the template (confirmed): the save points go
        find(browser, "#reset").click()
        assert "template" in accept_confirm()
        flash_says("reset to its template")
        assert service.get(f"{path}/saves", auth=SUE).json()["saves"] == []
        assert service.get(path, auth=SUE).json()["last_saved_at"] is None
        wait(browser, lambda d: find(d, "#no-saves").is_displayed(), what="no save point")
        wait(browser, lambda d: "never" in find(d, row).text, what="never saved")
        shot(browser, "sessions")

        # another student sees only their own
        log_out(browser)
        log_in(browser, service, una)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR,
                                                f'tr[data-key="{theirs["uuid"]}"]'),
             what="una's session")
        assert not browser.find_elements(By.CSS_SELECTOR, row)
        assert fetch(browser, "GET", path)["status"] == 403

        # a teacher sees everybody's, with the student column, and may neither reset nor
        # start them (a student's own: README, "Accounts and policy")
        log_out(browser)
        log_in(browser, service, TOM, "/ui/sessions")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sessions tr")) == 2,
             what="both sessions")
        assert texts(browser, "table.data thead th")[:2] == ["Template", "Student"]
        assert "sue" in find(browser, row).text
        assert not find(browser, "#create-section").is_displayed()
        find(browser, f'[data-open="{uuid}"]').click()
        wait(browser, lambda d: find(d, "#panel-h").text == "Session tp3-reseaux v1 of sue",
             what="sue's session")
        assert not find(browser, "#reset").is_displayed()
        assert not find(browser, "#start").is_displayed()
        shot(browser, "sessions-teacher")

        # the teacher opens a room for the TP from its page; una's seat shows her
        assert service.post("/v1/rooms", {"name": "tpr9"}, auth=ADA).status_code == 201
        for label, seat in (("A1", "a01"), ("A2", "a02")):
            assert service.put(f"/v1/rooms/tpr9/seats/{label}", {"node": seat}, auth=ADA).ok
        browser.get(f"{service.url}/ui/rooms/tpr9")
        wait(browser, lambda d: "session of una" in find(d, '#seats li[data-label="A2"]').text,
             what="una on seat A2")
        wait(browser, lambda d: "tp3-reseaux" in find(d, "#tp-template").text,
             what="the templates")
        find(browser, '#tp input[name="power_on"]').click()  # these seats have no power
        find(browser, "#tp button[type=submit]").click()
        wait(browser, lambda d: "Open for TP tp3-reseaux (started by tom"
             in find(d, "#tp-state").text, what="the open TP")
        assert service.get("/v1/rooms/tpr9", auth=TOM).json()["tp"]["template"] == "tp3-reseaux"
        shot(browser, "room-tp")
        find(browser, "#tp-end").click()
        wait(browser, lambda d: "not open" in find(d, "#tp-state").text, what="the TP's end")
        assert service.get("/v1/rooms/tpr9", auth=TOM).json()["tp"] is None

        # an admin, who may list the nodes, picks the seat from a select of them
        log_out(browser)
        log_in(browser, service, ADA, "/ui/sessions")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'[data-open="{uuid}"]'),
             what="sue's session")
        find(browser, f'[data-open="{uuid}"]').click()
        wait(browser, lambda d: find(d, "#seat").tag_name == "select"
             and texts(d, "#seat option") == ["a01", "a02"], what="the seat select")
        assert service.post(f"/v1/sessions/{theirs['uuid']}/stop", {}, auth=una).ok
    finally:
        service.proc.stop()
        left = our_processes(run_dir)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)
        assert not left, f"the service left storage processes running: {left}"
