"""The web console in a real browser: Postfix -> milterguard -> the quarantine, then
`milterguard web` and a headless Chromium (Debian's, through chromedriver) on loopback.

Releases go through a second Postfix (the re-injection service) to the sink, as with
`milterguard quarantine release`.  Screenshots of each page go to docs/screenshots/
when MILTERGUARD_SCREENSHOTS is set (else to the test's temporary directory).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid

import pytest

from milterguard.cli import main
from support import wait_until
from support.quarantine import RCPTS, SENDER, held_message, listed, message
from support.web import (ConsoleProcess, add_user, browser_available, chromium, cli_argv, performance_requests,
                         screenshot)

pytestmark = [pytest.mark.postfix,
              pytest.mark.skipif(browser_available() is not None, reason=str(browser_available()))]

ADMIN, VIEWER = ("root-admin", "admin password 1"), ("just-looking", "viewer password 1")


@pytest.fixture
def reinject(postfix_factory):
    return postfix_factory(None, name="reinject")


@pytest.fixture
def sets(milterguard, reinject, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    return {"quarantine.url": milterguard.sets["quarantine.url"],
            "quarantine.reinject": f"127.0.0.1:{reinject.smtpd_port}",
            "lists.dir": str(lists), "web.login_failures": 3}


@pytest.fixture
def cli(milterguard, sets, capsys):
    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        status = main(["quarantine", *args, *cli_argv(milterguard.etc_dir, sets)])
        return status, capsys.readouterr().out

    return run


@pytest.fixture
def console(milterguard, sets, tmp_path):
    add_user(milterguard.etc_dir, sets, *ADMIN[:1], "admin", ADMIN[1])
    add_user(milterguard.etc_dir, sets, VIEWER[0], "viewer", VIEWER[1])
    proc = ConsoleProcess(tmp_path / "web", milterguard.etc_dir, sets).start()
    yield proc
    proc.stop()


@pytest.fixture
def browser(tmp_path):
    driver = chromium(tmp_path)
    yield driver
    driver.quit()


def log_in(browser, console, who) -> None:
    from selenium.webdriver.common.by import By

    browser.get(console.url + "/login")
    browser.find_element(By.ID, "name").send_keys(who[0])
    browser.find_element(By.ID, "password").send_keys(who[1])
    submit(browser, "login")


def submit(browser, button: str) -> None:
    """Click BUTTON and wait for the page it posts to (never the element of the page before)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    before = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.ID, button).click()
    WebDriverWait(browser, 30).until(expected_conditions.staleness_of(before))


def http_session(console, who):
    """An httpx client logged in as WHO, and the CSRF token of its session (read from a page)."""
    import httpx

    client = httpx.Client(base_url=console.url, timeout=30, follow_redirects=False)
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    done = client.post("/login", data={"name": who[0], "password": who[1], "csrf": token})
    assert done.status_code == 303, done.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/overview").text).group(1)
    return client, csrf


def outside(urls: list[str], console) -> list[str]:
    return [u for u in urls if not (u.startswith(console.url + "/") or u.startswith(("data:", "about:")))]


def test_admin_logs_in_sees_held_mail_and_releases_it(postfix, milterguard, sink, cli, console, browser, tmp_path):
    from selenium.webdriver.common.by import By

    record, msgid = held_message(postfix, milterguard, cli)
    browser.get(console.url + "/quarantine")
    assert "/login" in browser.current_url  # no session: the login page
    screenshot(browser, "login", tmp_path)
    log_in(browser, console, ADMIN)
    browser.get(console.url + "/quarantine")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.list tbody tr")
    assert any(record["id"] in r.get_attribute("innerHTML") for r in rows)
    screenshot(browser, "quarantine", tmp_path)
    browser.find_element(By.CSS_SELECTOR, f"a[href='/quarantine/{record['id']}']").click()
    assert browser.find_element(By.ID, "subject").text == "held for review"
    assert "CANARY_REVIEW" in browser.find_element(By.CSS_SELECTOR, "pre.explain").text
    screenshot(browser, "message", tmp_path)
    submit(browser, "release")
    assert "released to bob@example.net, carol@example.org" in browser.find_element(By.ID, "notice").text
    got = sink.wait_for_message_id(msgid)
    assert sorted(got.rcpt_tos) == RCPTS and got.header("X-Milterguard-Released").startswith(f"by {ADMIN[0]} at")
    # The same record the CLI keeps, and the console's audit log.
    assert cli("show", record["id"], "--json")[1].count('"kind":"release"') == 1
    browser.get(console.url + "/audit")
    audit = browser.find_element(By.ID, "audit").text
    assert f"{ADMIN[0]} release {record['id']}" in audit and f"{ADMIN[0]} login" in audit
    # The filter recorded the verdict in the history, which opens on its explanation.
    browser.get(console.url + "/history?q=" + urllib.parse.quote(record["queue_id"]))
    browser.find_element(By.CSS_SELECTOR, "#history tbody a").click()
    assert "CANARY_REVIEW" in browser.find_element(By.ID, "explain").text


def test_a_viewer_cannot_release(postfix, milterguard, sink, cli, console, browser):
    from selenium.webdriver.common.by import By

    record, msgid = held_message(postfix, milterguard, cli)
    log_in(browser, console, VIEWER)
    browser.get(f"{console.url}/quarantine/{record['id']}")
    assert browser.find_element(By.ID, "subject").text == "held for review"
    assert browser.find_elements(By.ID, "release") == []  # no button
    client, csrf = http_session(console, VIEWER)  # and the POST itself is refused
    done = client.post(f"/quarantine/{record['id']}/action", data={"action": "release", "csrf": csrf})
    assert done.status_code == 403
    done = client.post("/quarantine/bulk", data={"action": "delete", "id": record["id"], "csrf": csrf})
    assert done.status_code == 403
    assert [r["id"] for r in listed(cli)] == [record["id"]] and listed(cli)[0]["released"] == {}
    time.sleep(1)
    assert not any(m.message_id == msgid for m in sink.messages)


def test_a_wrong_password_and_a_missing_csrf_token_are_refused(postfix, milterguard, cli, console, browser):
    from selenium.webdriver.common.by import By

    record, _msgid = held_message(postfix, milterguard, cli)
    log_in(browser, console, (ADMIN[0], "not the password"))
    assert browser.find_element(By.ID, "login-failed").is_displayed()
    browser.get(console.url + "/quarantine")
    assert "/login" in browser.current_url
    import httpx

    # A login form posted without its token (from another site, say) is refused before the password is read.
    assert httpx.post(console.url + "/login", data={"name": ADMIN[0], "password": ADMIN[1]}).status_code == 403
    client, csrf = http_session(console, ADMIN)
    done = client.post(f"/quarantine/{record['id']}/action", data={"action": "delete"})
    assert done.status_code == 403 and "CSRF" in done.text
    done = client.post(f"/quarantine/{record['id']}/action", data={"action": "delete", "csrf": csrf + "x"})
    assert done.status_code == 403
    assert [r["id"] for r in listed(cli)] == [record["id"]]  # still there
    # Three failures of one name lock it, the right password too, for 15 minutes.
    for _ in range(2):
        log_in(browser, console, (VIEWER[0], "wrong"))
    log_in(browser, console, VIEWER)
    assert browser.find_element(By.ID, "login-failed").is_displayed()
    assert "login-throttled" in client.get("/audit").text


def test_cookies_are_httponly_strict_and_secure_behind_tls(console):
    import httpx

    def log_in_as_admin(headers: dict) -> str:
        with httpx.Client(base_url=console.url, timeout=30, headers=headers) as client:
            page = client.get("/login")
            assert ("Secure" in page.headers["set-cookie"]) == bool(headers)
            token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            # As a browser on HTTPS would send it (httpx keeps Secure cookies off plain http).
            done = client.post("/login", data={"name": ADMIN[0], "password": ADMIN[1], "csrf": token},
                               headers={"Cookie": f"mg_login={token}"})
            assert done.status_code == 303
            return done.headers["set-cookie"]

    plain = log_in_as_admin({})
    assert "mg_session=" in plain and "HttpOnly" in plain and "SameSite=strict" in plain and "Secure" not in plain
    # The reverse proxy on loopback (web.trusted_proxies) says the client came over HTTPS.
    behind = log_in_as_admin({"X-Forwarded-Proto": "https"})
    assert "mg_session=" in behind and "HttpOnly" in behind and "Secure" in behind
    page = httpx.get(console.url + "/login")
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none' covers scripts
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"


HOSTILE_HTML = """<html><head><script>document.title='pwned-head'</script></head><body>
<p>MILTERGUARD-CANARY-REVIEW</p>
<script>document.title='pwned'; alert(1)</script>
<img src="http://127.0.0.9:9/x.png" onerror="document.title='pwned-onerror'">
<img src="x" onerror="alert(2)">
<a href="javascript:alert(3)" id="js">click</a>
<iframe src="http://127.0.0.9:9/frame"></iframe>
<div style="background:url(http://127.0.0.9:9/bg.png)">styled</div>
<link rel="stylesheet" href="http://127.0.0.9:9/s.css">
<p>hostile but harmless text</p>
</body></html>"""


def hostile_message() -> tuple[bytes, str]:
    msgid = f"{uuid.uuid4().hex}@example.com"
    subject = "<script>document.title='pwned-subject'</script><img src=x onerror=alert(4)>"
    text = (f"From: <{SENDER}>\r\nTo: <bob@example.net>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 02 Jan 2023 10:00:00 +0000\r\nMessage-ID: <{msgid}>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/html; charset=utf-8\r\n\r\n" + HOSTILE_HTML.replace("\n", "\r\n") + "\r\n")
    return text.encode(), f"<{msgid}>"


def test_a_hostile_message_shows_inert(postfix, milterguard, cli, console, browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    record, _msgid = held_message(postfix, milterguard, cli, raw_msgid=hostile_message())
    log_in(browser, console, ADMIN)
    performance_requests(browser)  # what the login fetched
    browser.get(f"{console.url}/quarantine")
    browser.get(f"{console.url}/quarantine/{record['id']}")
    frame = browser.find_element(By.ID, "preview")
    assert frame.get_attribute("sandbox") == ""
    time.sleep(1)  # room for anything the page would load or run
    # The Subject is shown as text, not markup.
    assert browser.find_element(By.ID, "subject").text.startswith("<script>document.title='pwned-subject'")
    assert browser.title.startswith("<script>document.title=") and browser.title.endswith(" · milterguard")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    screenshot(browser, "message-hostile", tmp_path)
    browser.switch_to.frame(frame)
    body = browser.find_element(By.TAG_NAME, "body")
    assert "hostile but harmless text" in body.text
    assert browser.find_elements(By.TAG_NAME, "script") == [] and browser.find_elements(By.TAG_NAME, "img") == []
    assert browser.find_elements(By.TAG_NAME, "iframe") == []
    assert all(a.get_attribute("href") in (None, "") for a in browser.find_elements(By.TAG_NAME, "a"))
    assert browser.find_element(By.TAG_NAME, "title").get_attribute("textContent") == "preview"
    browser.switch_to.default_content()
    requests = performance_requests(browser)
    assert any(u.endswith(f"/quarantine/{record['id']}/preview") for u in requests)
    assert outside(requests, console) == [], requests
    # The browser console shows no script ran (nothing was even attempted beyond the CSP).
    assert not [e for e in browser.get_log("browser") if "pwned" in e.get("message", "")]


def test_the_digest_links_release_and_dismiss_for_their_recipient(postfix, milterguard, sink, cli, console, sets,
                                                                    browser):
    from selenium.webdriver.common.by import By

    record, msgid = held_message(postfix, milterguard, cli)

    def digest() -> list[dict]:
        done = subprocess.run([sys.executable, "-m", "milterguard", "quarantine", "digest", "--json",
                               *cli_argv(milterguard.etc_dir, dict(sets, **{"web.url": console.url}))],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    def links(rcpt: str, count: int) -> dict[str, str]:
        """The links of the COUNTth digest RCPT got."""
        mails = wait_until(lambda: (got := [m for m in sink.messages if m.header("To") == rcpt
                                            and "Held mail" in (m.header("Subject") or "")]) and len(got) >= count
                           and got, 10, what=f"digest {count} to {rcpt}")
        text = mails[count - 1].message.get_content()
        return {action: re.search(rf"{action}: +(\S+)", text).group(1) for action in ("Release", "Delete")}

    assert sorted((s["rcpt"], s["messages"]) for s in digest()) == [(r, 1) for r in RCPTS]
    bob, carol = links("bob@example.net", 1), links("carol@example.org", 1)
    assert carol["Release"].startswith(console.url + "/d/")
    # Bob deletes it from his digest: Carol still waits for it, so it stays for her.
    browser.get(bob["Delete"])
    submit(browser, "confirm")
    assert "removed from your digest" in browser.find_element(By.ID, "said").text
    assert [r["id"] for r in listed(cli)] == [record["id"]]
    assert [s["rcpt"] for s in digest()] == ["carol@example.org"]  # not listed to Bob again
    carol = links("carol@example.org", 2)
    browser.get(carol["Release"])  # no account: the link alone, and a confirmation
    time.sleep(0.5)
    assert not any(m.message_id == msgid for m in sink.messages)  # opening the link releases nothing
    submit(browser, "confirm")
    assert "released" in browser.find_element(By.ID, "said").text
    got = sink.wait_for_message_id(msgid)
    assert got.rcpt_tos == ["carol@example.org"]  # to that recipient only
    # A link changed by a single character is refused.
    tampered = carol["Release"][:-2] + ("A" if carol["Release"][-2] != "A" else "B") + carol["Release"][-1]
    browser.get(tampered)
    assert "not valid" in browser.find_element(By.ID, "error").text


def test_overview_history_symbols_test_and_lists(postfix, milterguard, cli, console, browser, tmp_path, sets):
    from selenium.webdriver.common.by import By

    for i in range(3):
        raw, _ = message(f"plain note {i}", subject=f"note {i}")
        assert postfix.send(raw, SENDER, RCPTS).code == 250
    held_message(postfix, milterguard, cli)
    log_in(browser, console, ADMIN)

    def counted():
        browser.get(console.url + "/overview?range=hour")
        return browser.find_element(By.CSS_SELECTOR, ".cards .big").text == "4" or None

    wait_until(counted, 20, what="4 messages on the overview")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart rect.a-review")
    assert "CANARY_REVIEW" in browser.find_element(By.ID, "top-symbols").text
    assert socket.gethostname() in browser.find_element(By.CSS_SELECTOR, ".node h3").text  # the filter node reported
    screenshot(browser, "overview", tmp_path)

    browser.get(console.url + "/history")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")) == 4
    browser.get(console.url + "/history?action=review")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")) == 1
    screenshot(browser, "history", tmp_path)

    browser.get(console.url + "/symbols")
    row = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#symbols tbody tr") if r.text.startswith("CANARY_REVIEW"))
    assert "core.yaml:" in row.text and row.text.split()[-1] == "1"
    screenshot(browser, "symbols", tmp_path)

    eml = tmp_path / "test.eml"
    eml.write_bytes(message("MILTERGUARD-CANARY-REVIEW", subject="uploaded")[0])
    browser.get(console.url + "/test")
    browser.find_element(By.ID, "message").send_keys(str(eml))
    submit(browser, "scan")
    result = browser.find_element(By.ID, "result").text
    scan = subprocess.run([sys.executable, "-m", "milterguard", "scan", "--explain", str(eml),
                           *cli_argv(milterguard.etc_dir, sets)], capture_output=True, text=True, timeout=120)
    assert "CANARY_REVIEW" in result and "-> review" in result
    assert _symbol_lines(result) == _symbol_lines(scan.stdout)  # the same engine's answer
    screenshot(browser, "test", tmp_path)

    browser.get(console.url + "/lists")
    browser.find_element(By.ID, "entries").send_keys("192.0.2.7 spammer@example.net")
    browser.find_element(By.ID, "domain").send_keys("example.org")
    submit(browser, "apply")
    assert "added to the block list example.org" in browser.find_element(By.ID, "notice").text
    assert (tmp_path / "lists" / "example.org" / "block.map").read_text().split() == ["192.0.2.7",
                                                                                      "spammer@example.net"]
    assert "spammer@example.net" in browser.find_element(By.ID, "lists").text
    screenshot(browser, "lists", tmp_path)
    browser.get(console.url + "/audit")
    assert "list-add" in browser.find_element(By.ID, "audit").text
    screenshot(browser, "audit", tmp_path)


def _symbol_lines(text: str) -> list[str]:
    """The symbol lines of an explanation, without the times per check."""
    return sorted(line.split("  ")[0] + line.split()[1] for line in text.splitlines()
                  if re.match(r"^[A-Z][A-Z0-9_]+\s+[+-]\d", line)) + \
        [line for line in text.splitlines() if line.startswith("total ")]


def test_bulk_actions_and_learning_without_redis(postfix, milterguard, sink, cli, console, browser):
    from selenium.webdriver.common.by import By

    first, msgid1 = held_message(postfix, milterguard, cli, raw_msgid=message("MILTERGUARD-CANARY-REVIEW", "one"))
    second, msgid2 = held_message(postfix, milterguard, cli, raw_msgid=message("MILTERGUARD-CANARY-REVIEW", "two"))
    log_in(browser, console, ADMIN)
    browser.get(console.url + "/quarantine")

    def choose_all_and(action: str) -> None:
        for box in browser.find_elements(By.CSS_SELECTOR, "input[name=id]"):
            box.click()
        before = browser.find_element(By.TAG_NAME, "html")
        browser.find_element(By.CSS_SELECTOR, f"button[name=action][value={action}]").click()
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 30).until(expected_conditions.staleness_of(before))

    # No Redis in this configuration: learning says so, and nothing is released.
    choose_all_and("release-ham")
    problem = browser.find_element(By.ID, "problem").text
    assert "Redis is not configured" in problem and first["id"] in problem and second["id"] in problem
    assert all(r["released"] == {} for r in listed(cli))
    choose_all_and("delete")
    assert "delete: 2 of 2 done" in browser.find_element(By.ID, "notice").text
    assert listed(cli) == []
    assert not any(m.message_id in (msgid1, msgid2) for m in sink.messages)
    browser.get(console.url + "/audit")
    audit = browser.find_element(By.ID, "audit").text
    assert f"{ADMIN[0]} delete {first['id']}" in audit and f"{ADMIN[0]} delete {second['id']}" in audit
