"""The history of verdicts and the console's users: the stores on SQLite and PostgreSQL,
`milterguard user`, and the filter recording its verdicts through Postfix, also when the
database is away (the mail goes on)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from milterguard.cli import main
from milterguard.stores.history import BUCKET, History, HistoryError, row
from milterguard.stores.quarantine import Quarantine
from milterguard.stores.users import THROTTLE_WINDOW, Users, UsersError, check_link, sign_link
from support import REPO_ROOT, wait_until
from support.postgres import PostgresCluster, postgres_available
from support.quarantine import RCPTS, SENDER, message

NOW = 1_790_000_000.0


def a_row(at: float, action: str = "accept", symbols=("BAYES_HAM",), subject: str = "hello", **kw) -> dict:
    return row(at=at, node=kw.get("node", "node-a"), queue_id=kw.get("queue_id", "4ABCD"), client_ip="192.0.2.1",
               client_name="mx.example.net", sender=kw.get("sender", SENDER), rcpts=RCPTS, subject=subject,
               score=1.5, action=action, symbols=[{"name": s, "weight": 1.0, "options": []} for s in symbols],
               explain="SYMBOLS ... total")


def exercise(history: History) -> None:
    history.add_many([a_row(NOW - 8 * 86400, "accept", ("OLD",), queue_id="Q0")])
    history.add_many([a_row(NOW - 30, "reject", ("RBL_X", "SUBJ_SHOUTING"), subject="FINAL NOTICE", queue_id="Q1"),
                      a_row(NOW - 20, "accept", ("BAYES_HAM",), sender="bob@example.org", queue_id="Q2"),
                      a_row(NOW - 10, "review", ("SUBJ_SHOUTING",), subject="Notes 100%_off", queue_id="Q3")])
    assert [r["queue_id"] for r in history.search()] == ["Q3", "Q2", "Q1", "Q0"]
    assert [r["queue_id"] for r in history.search("final")] == ["Q1"]
    assert [r["queue_id"] for r in history.search("100%_")] == ["Q3"]  # LIKE's wildcards are plain text
    assert [r["queue_id"] for r in history.search("%")] == ["Q3"]
    assert [r["queue_id"] for r in history.search(symbol="subj_shouting")] == ["Q3", "Q1"]
    assert [r["queue_id"] for r in history.search("notes", symbol="SUBJ_SHOUTING", action="review")] == ["Q3"]
    assert history.search("notes", action="reject") == []
    assert [r["queue_id"] for r in history.search(symbol="SUBJ_SHOUTING", action="reject")] == ["Q1"]
    assert [r["queue_id"] for r in history.search(action="accept", text="BOB@example.ORG")] == ["Q2"]
    first = history.search(limit=2)
    assert [r["queue_id"] for r in history.search(before=first[-1]["id"], limit=2)] == ["Q1", "Q0"]
    one = history.get(first[0]["id"])
    assert one["explain"] == "SYMBOLS ... total" and one["rcpts"] == RCPTS and one["symbols"][0]["name"] == "SUBJ_SHOUTING"
    series = history.action_series(NOW - 3600, BUCKET, NOW)
    assert {a: sum(v) for a, v in series["actions"].items()} == {"reject": 1, "accept": 1, "review": 1}
    assert len(series["starts"]) == len(series["actions"]["accept"]) == 13
    day = history.action_series(NOW - 86400, 3600, NOW)  # read from the hourly counts
    assert {a: sum(v) for a, v in day["actions"].items()} == {"reject": 1, "accept": 1, "review": 1}
    assert day["actions"]["review"][-1] == 1 and len(day["starts"]) == 25
    week = history.action_series(NOW - 9 * 86400, 6 * 3600, NOW)
    assert sum(week["actions"]["accept"]) == 2
    assert history.count_since(NOW - 3600) == 3 and history.count_since(0) == 4
    assert history.top_symbols(NOW - 3600) == [("SUBJ_SHOUTING", 2), ("BAYES_HAM", 1), ("RBL_X", 1)]
    assert dict(history.top_symbols())["OLD"] == 1
    history.report_status("node-a", 11, [{"name": "clamd at 127.0.0.1:3310", "up": False, "since": NOW - 5,
                                          "failures": 3}], 2)
    history.report_status("node-a", 12, [{"name": "clamd at 127.0.0.1:3310", "up": True, "since": None,
                                          "failures": 0}], 0)
    [node] = history.nodes()
    assert node["processes"] == 2 and node["dropped"] == 2
    assert node["dependencies"] == [{"name": "clamd at 127.0.0.1:3310", "up": False, "since": NOW - 5}]
    assert history.expire(7, now=NOW) == 1
    assert [r["queue_id"] for r in history.search()] == ["Q3", "Q2", "Q1"]
    assert history.search("q0") == [] and "OLD" not in dict(history.top_symbols())


def test_history_on_sqlite(tmp_path):
    store = Quarantine(f"sqlite:///{tmp_path}/q/quarantine.db")
    exercise(History(store.engine))
    assert History(store.engine).search(limit=1)  # opened again: the schema is kept, not made again


@pytest.fixture(scope="module")
def pg():
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_history_and_users_on_postgresql(pg):
    store = Quarantine(pg.url)
    exercise(History(store.engine))
    users = Users(store.engine)
    users.add("pg-admin", "admin", "a long password here")
    token, role = users.login("pg-admin", "a long password here", "127.0.0.1", 5, 1)
    assert role == "admin" and users.session(token)["name"] == "pg-admin"
    assert users.key("digest") == Users(store.engine).key("digest")


def test_a_newer_history_schema_is_refused(tmp_path):
    store = Quarantine(f"sqlite:///{tmp_path}/quarantine.db")
    History(store.engine)
    store.engine.dispose()
    from milterguard.stores import history as h

    with store.engine.begin() as conn:
        conn.execute(h.version.update().values(version=h.SCHEMA_VERSION + 1))
    with pytest.raises(HistoryError, match="newer than this milterguard"):
        History(store.engine)


def test_users_passwords_sessions_and_throttling(tmp_path):
    users = Users(Quarantine(f"sqlite:///{tmp_path}/quarantine.db").engine)
    users.add("alice", "admin", "correct horse battery")
    with pytest.raises(UsersError, match="exists"):
        users.add("alice", "viewer", "another long password")
    with pytest.raises(UsersError, match="too short"):
        users.add("bob", "viewer", "short")
    with pytest.raises(UsersError, match="role"):
        users.add("bob", "root", "a long password here")
    stored = users._run(lambda conn: conn.execute(__import__("sqlalchemy").text(
        "select password from console_users where name='alice'")).scalar())
    assert stored.startswith("scrypt$") and "correct horse" not in stored
    assert users.login("alice", "wrong password!", "192.0.2.1", 3, 1) is None
    token, role = users.login("alice", "correct horse battery", "192.0.2.1", 3, 1)
    session = users.session(token)
    assert role == "admin" and session["name"] == "alice" and len(session["csrf"]) >= 24
    assert users.session(token + "x") is None and users.session("") is None
    users.logout(token)
    assert users.session(token) is None
    # Three failures of a name lock it for the window, from any address; an unknown name counts too.
    for _ in range(2):
        assert users.login("alice", "wrong password!", "192.0.2.2", 3, 1) is None
    assert users.login("alice", "correct horse battery", "192.0.2.3", 3, 1) is None
    assert not users.throttled("alice", "192.0.2.3", 3, now=time.time() + THROTTLE_WINDOW + 1)
    actions = [r["action"] for r in users.audit_log()]
    assert actions.count("login-failed") == 3 and actions.count("login") == 1 and actions[0] == "login-throttled"
    users.delete("alice")
    with pytest.raises(UsersError, match="no user"):
        users.delete("alice")


def test_signed_links_expire_and_refuse_changes():
    key = b"k" * 32
    token = sign_link(key, "abcdefghij", "Carol@Example.org", "release", int(NOW) + 60)
    assert check_link(key, token, now=NOW) == ("abcdefghij", "carol@example.org", "release")
    assert check_link(key, token, now=NOW + 61) is None
    assert check_link(b"x" * 32, token, now=NOW) is None
    body, mac = token.split(".")
    forged = sign_link(key, "abcdefghij", "carol@example.org", "delete", int(NOW) + 60).split(".")[0]
    assert check_link(key, f"{forged}.{mac}", now=NOW) is None
    assert check_link(key, "garbage", now=NOW) is None


def test_user_command_reads_the_password_from_stdin(tmp_path):
    sets = ["--etc-dir", str(tmp_path), "--set", f"quarantine.url=sqlite:///{tmp_path}/q/quarantine.db"]

    def user(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "milterguard", "user", *args, *sets], input=stdin,
                              capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)

    assert user("add", "carol", "--role", "viewer", stdin="a long password here\n").returncode == 0
    done = user("add", "carol", "--role", "admin", stdin="a long password here\n")
    assert done.returncode == 2 and "exists" in done.stderr
    assert user("add", "dave", stdin="x" * 12 + "\n").returncode == 2  # no role
    listed = user("list", "--json")
    assert [json.loads(line)["name"] for line in listed.stdout.splitlines()] == ["carol"]
    users = Users(Quarantine(f"sqlite:///{tmp_path}/q/quarantine.db").engine)
    assert users.login("carol", "a long password here", "127.0.0.1", 5, 1)[1] == "viewer"
    assert user("delete", "carol").returncode == 0
    assert user("delete", "carol").returncode == 2


@pytest.mark.postfix
def test_the_filter_records_each_verdict(postfix, milterguard, capsys):
    sent = []
    for body, subject in (("a plain note", "note"), ("MILTERGUARD-CANARY-REVIEW", "held"),
                          ("MILTERGUARD-CANARY-REJECT", "refused")):
        raw, _msgid = message(body, subject=subject)
        result = postfix.send(raw, SENDER, RCPTS)
        sent.append((subject, result))
    assert [r.code for _s, r in sent] == [250, 250, 550]
    history = History(Quarantine(milterguard.sets["quarantine.url"]).engine)
    rows = wait_until(lambda: (found := history.search()) and len(found) == 3 and found, 15,
                      what="three rows in the history", on_timeout=milterguard.log_tail)
    by_subject = {r["subject"]: r for r in rows}
    assert {s: r["action"] for s, r in by_subject.items()} == {"note": "accept", "held": "review", "refused": "reject"}
    held = by_subject["held"]
    assert held["sender"] == SENDER and held["rcpts"] == RCPTS and held["client_ip"] == "127.0.0.1"
    assert held["queue_id"] == sent[1][1].queue_id
    assert "CANARY_REVIEW" in [s["name"] for s in held["symbols"]]
    assert "CANARY_REVIEW" in history.get(held["id"])["explain"]
    # Each worker reports its health; `quarantine expire` keeps what is younger than the retention.
    wait_until(lambda: history.nodes() or None, 15, what="a health report")
    capsys.readouterr()
    assert main(["quarantine", "expire", "--json", "--etc-dir", str(milterguard.etc_dir),
                 "--set", f"quarantine.url={milterguard.sets['quarantine.url']}"]) == 0
    assert json.loads(capsys.readouterr().out)["history_removed"] == 0


@pytest.mark.postfix
def test_mail_goes_on_when_the_history_cannot_be_written(milterguard_factory, postfix_factory, tmp_path):
    # The database's directory is a file: nothing can be opened or written there.
    (tmp_path / "blocked").write_text("not a directory\n")
    mg = milterguard_factory(sets={"quarantine.url": f"sqlite:///{tmp_path}/blocked/quarantine.db"}, workers=1)
    pf = postfix_factory(mg.socket)
    for i in range(5):
        raw, msgid = message(f"a plain note {i}", subject=f"note {i}")
        assert pf.send(raw, SENDER, RCPTS).code == 250
        assert mg.verdict_for(msgid).action == "accept"
    line = wait_until(lambda: next((l for l in mg.log_text().splitlines()
                                    if "the quarantine database (history) unavailable" in l), None), 15,
                      what="the history outage line", on_timeout=mg.log_tail)
    assert "verdicts are not recorded in the history" in line
    assert sum("the quarantine database (history) unavailable" in l for l in mg.log_text().splitlines()) == 1
    assert "Traceback" not in mg.log_text()
