"""Live retention of edits: which facts a check scores, the share it publishes, and the checks
on a live server with the real model."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from svc_helpers import live_server, wait_for, wait_status
from test_observability import EIFFEL, samples, value

from editing.facts import Fact
from editing.models import LoadedModel
from service.retention import FactId, Rotation, Window, facts_held
from service.settings import Settings


def ids(*names: str) -> list[FactId]:
    return [(name, "s", "p") for name in names]


def test_the_rotation_goes_round_the_active_facts_oldest_first() -> None:
    rotation = Rotation()
    active = ids("a", "b", "c", "d", "e")
    assert rotation.pick(active, 2) == ids("a", "b")
    assert rotation.pick(active, 2) == ids("c", "d")
    # The round ends with e; the next starts again from the oldest.
    assert rotation.pick(active, 2) == ids("e", "a")
    # A fact added mid-round joins its end; a removed one leaves it.
    active = ids("a", "c", "d", "e", "f")
    assert rotation.pick(active, 2) == ids("c", "d")
    assert rotation.pick(active, 2) == ids("e", "f")
    assert rotation.pick(active, 3) == ids("a", "c", "d")
    # A sample as large as the active set takes all of it; none, or nothing active: nothing.
    assert sorted(rotation.pick(active, 8)) == sorted(active)
    assert rotation.pick(active, 0) == [] and rotation.pick([], 4) == []


def test_every_fact_is_scored_once_per_round() -> None:
    rotation = Rotation()
    active = ids(*"abcdefg")
    seen = [f for _ in range(7) for f in rotation.pick(active, 3)]  # 21 picks: three rounds
    assert all(seen.count(f) == 3 for f in active)


def test_the_window_shares_the_last_checks_of_edits_still_in_effect() -> None:
    window = Window(size=4)
    assert window.share() is None
    for edit_id, held in [("a", False), ("b", True), ("b", True), ("c", True), ("c", False)]:
        window.add(edit_id, held)
    assert window.share() == 0.75  # the first check (a, lost) has left the window of 4
    window.keep({"b"})  # c reverted
    assert window.share() == 1.0
    window.keep(set())
    assert window.share() is None


def test_a_fact_holds_when_the_new_target_beats_the_ground_truth(lm: LoadedModel) -> None:
    prompt = "The Eiffel Tower is located in the city of"
    paris = Fact("Eiffel Tower", prompt, target_new="Paris", ground_truth="Rome")
    rome = Fact("Eiffel Tower", prompt, target_new="Rome", ground_truth="Paris")
    assert facts_held(lm, [paris, rome]) == [True, False]  # the unedited model says Paris


def test_a_live_server_checks_its_edits_after_each_edit(
    lm: LoadedModel, c0: dict, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(probes="off", v_steps=10, retention_sample=8)
    darrieux = {
        "subject": "Danielle Darrieux",
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "ground_truth": "French",
    }
    no_truth = {  # cannot be judged: never checked
        "subject": "Michael Jordan",
        "prompt": "Michael Jordan plays the sport of",
        "target_new": "tennis",
    }
    with live_server(settings, lm, c0) as live:
        assert "editserve_edit_retention" not in {name for name, _ in samples(live)}
        eiffel = live.client.post("/edits", json={**EIFFEL, "ground_truth": "Paris"}).json()["id"]
        assert wait_status(live.client, eiffel, {"applied", "failed"})["status"] == "applied"
        others = []
        for fact in (darrieux, no_truth):  # one at a time: a batch would be one check
            others.append(live.client.post("/edits", json=fact).json()["id"])
            assert wait_status(live.client, others[-1], {"applied"})["status"] == "applied"

        def checked(edit_id: str) -> dict:
            edit: dict = live.client.get(f"/edits/{edit_id}").json()
            return edit

        # The check follows the status (the client does not wait for it).
        wait_for(lambda: checked(others[0])["retention_checked_at"] is not None, 30, "a check")
        edit = checked(eiffel)
        assert edit["retention_held"] is True, edit
        assert datetime.fromisoformat(edit["retention_checked_at"]) > datetime.fromisoformat(
            edit["applied_at"]
        )
        assert checked(others[1])["retention_checked_at"] is None
        assert checked(others[1])["retention_held"] is None
        listed = {e["id"]: e for e in live.client.get("/edits").json()["edits"]}
        assert listed[eiffel]["retention_held"] is True
        # Eiffel checked after each of the three edits, Darrieux after the last two.
        wait_for(
            lambda: (
                value(live, "editserve_edits_checked_total", result="held")
                + value(live, "editserve_edits_checked_total", result="lost")
                == 5
            ),
            30,
            "five fact checks",
        )
        held = value(live, "editserve_edits_checked_total", result="held")
        lost = value(live, "editserve_edits_checked_total", result="lost")
        retention = value(live, "editserve_edit_retention")
        assert 0 <= retention <= 1 and retention == held / (held + lost)
        assert value(live, "editserve_edit_apply_seconds_count", phase="retention") == 3

        # A revert forgets the edit's checks: no result for it, none in the share.
        live.client.post(f"/edits/{eiffel}/revert")
        wait_status(live.client, eiffel, {"reverted"})
        wait_for(lambda: checked(eiffel)["retention_checked_at"] is None, 30, "the revert")
        assert checked(eiffel)["retention_held"] is None
