"""The registry never tells a lie: racing promotions, kills between registry writes, moves outside kftune.

Real processes on a real sqlite store; model versions without weights (the registry does not load them).
"""

import os
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from kftune import registry
from kftune.processes import started, where

pytestmark = pytest.mark.slow  # real processes: about a minute on 2 idle cores

NAME = "race-test"


@pytest.fixture
def store(mlflow_store):
    client = MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(6):
        client.create_model_version(NAME, source="file:///nonexistent", run_id=None)
    registry.promote(NAME, "1", "first champion", expected_champion="")
    return mlflow_store


def _in_subprocess(code: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"from kftune import registry\n{code}"],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _consistent() -> None:
    assert registry.check(NAME) == []
    moves = [e for e in registry.history(NAME) if e.action in ("promote", "rollback")]
    assert moves[-1].to_version == registry.version_by_alias(NAME, registry.CHAMPION)


@pytest.mark.parametrize("trial", range(2))
def test_racing_promotions_one_wins_the_others_are_refused(store, tmp_path, trial):
    champion = registry.version_by_alias(NAME, registry.CHAMPION)
    go = tmp_path / f"go-{trial}"
    code = ("import pathlib, sys, time\n"
            "print('ready', flush=True)\n"
            f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
            "try:\n"
            f"    registry.promote({NAME!r}, sys.argv[1], 'race', expected_champion={champion!r})\n"
            "    print('won')\n"
            "except registry.RegistryError as e:\n"
            "    print('refused:', e)\n")
    versions = [v for v in ("2", "3", "4", "5") if v != champion][:4]
    procs = [subprocess.Popen([sys.executable, "-c", f"from kftune import registry\n{code}", v], env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in versions]
    assert all(p.stdout.readline().strip() == "ready" for p in procs)  # every one imported mlflow and waits
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    won = [v for v, (out, _) in zip(versions, outs) if out.startswith("won")]
    assert len(won) == 1, outs
    refused = [out for out, _ in outs if out.startswith("refused")]
    assert len(refused) == len(versions) - 1
    assert all(f"champion moved: was v{champion} when the gate ran, now v{won[0]}" in r for r in refused)
    assert registry.version_by_alias(NAME, registry.CHAMPION) == won[0]
    assert registry.version_by_alias(NAME, registry.PREVIOUS) == champion
    events = registry.history(NAME)
    assert [e.to_version for e in events if e.action == "promote"][-1] == won[0]
    assert sum(e.action == "refuse" for e in events) == len(versions) - 1
    _consistent()


def test_holds_recorded_at_once_with_a_promotion_each_get_their_own_place_in_the_history(store, tmp_path):
    """Holds are written by register steps, moves by promote: the challenger alias and the history's order
    (one number per event) are written one at a time."""
    go = tmp_path / "go"
    hold = ("from kftune import gate\n"
            "gate.record({name!r}, gate.Verdict('hold', sys.argv[1], reasons=['below the champion']), 'tfidf_logreg')")
    move = "registry.promote({name!r}, sys.argv[1], 'race')"
    procs = []
    for version, action in (("2", hold), ("3", hold), ("4", hold), ("5", move)):
        code = ("import pathlib, sys, time\nprint('ready', flush=True)\n"
                f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n" + action.format(name=NAME))
        procs.append(subprocess.Popen([sys.executable, "-c", f"from kftune import registry\n{code}", version],
                                      env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert all(p.stdout.readline().strip() == "ready" for p in procs)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    events = registry.history(NAME)
    assert sorted(e.action for e in events) == ["hold", "hold", "hold", "promote", "promote"]
    assert sorted(e.seq for e in events) == list(range(1, 6)), [(e.action, e.seq) for e in events]
    _consistent()


@pytest.mark.parametrize("point", ["intent", "champion", "previous", "tags", "history"])
def test_a_kill_between_registry_writes_is_reconciled_by_the_next_command(store, point):
    p = _in_subprocess(f"registry.promote({NAME!r}, '2', 'killed midway', expected_champion='1')", KFTUNE_FAULT=point)
    p.communicate(timeout=120)
    assert p.returncode == -9, "the fault point killed the process"
    assert registry.check(NAME), "a half-done promotion is reported"
    done = registry.reconcile(NAME)
    assert done and "finished an interrupted promote: v1 -> v2" in done[0]
    assert registry.version_by_alias(NAME, registry.CHAMPION) == "2"
    assert registry.version_by_alias(NAME, registry.PREVIOUS) == "1"
    assert [e.to_version for e in registry.history(NAME) if e.action == "promote"] == ["1", "2"], "one event each"
    _consistent()
    registry.rollback(NAME, "and back")  # the next move works as usual
    assert registry.version_by_alias(NAME, registry.CHAMPION) == "1"
    _consistent()


def test_a_dead_lease_holder_does_not_block(store):
    p = _in_subprocess(f"registry.promote({NAME!r}, '2', 'dies holding the lease')", KFTUNE_FAULT="champion")
    p.communicate(timeout=120)
    assert MlflowClient().get_registered_model(f"{registry.LEASE_PREFIX}{NAME}"), "the lease was left behind"
    registry.promote(NAME, "3", "next one")
    assert registry.version_by_alias(NAME, registry.CHAMPION) == "3"
    assert registry.version_by_alias(NAME, registry.PREVIOUS) == "2", "the interrupted promotion was finished first"
    _consistent()


def test_a_live_holder_keeps_the_lease_past_its_age(store, monkeypatch):
    holder = _in_subprocess(f"import time\nwith registry.lease({NAME!r}):\n    print('held', flush=True)\n"
                            f"    time.sleep(60)")
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(registry, "LEASE_STALE_S", 0.0)  # every lease "old": only a dead pid may be broken
        monkeypatch.setattr(registry, "LEASE_WAIT_S", 2.0)
        with pytest.raises(registry.RegistryError, match="another promotion holds the registry lease"):
            registry.promote(NAME, "2", "must wait")
        assert registry.version_by_alias(NAME, registry.CHAMPION) == "1"
    finally:
        holder.kill()
        holder.communicate(timeout=60)


def test_a_stale_lease_from_another_host_is_broken_and_a_lease_is_deleted_only_by_its_holder(store, monkeypatch):
    import time as clock

    client, lock = MlflowClient(), f"{registry.LEASE_PREFIX}{NAME}"
    client.create_registered_model(lock, tags={"host": "another-host", "pid": "1", "token": "theirs",
                                               "since": str(clock.time() - registry.LEASE_ABANDONED_S - 1)})
    registry.promote(NAME, "2", "after a holder on another host died")  # breaks the stale lease, then moves
    assert registry.version_by_alias(NAME, registry.CHAMPION) == "2"
    # a live holder whose clock runs 130 s behind: its heartbeat looks old here, but it is judged by whether it
    # changes, on this machine's clock
    client.create_registered_model(lock, tags={"host": "another-host", "pid": "1", "token": "skewed",
                                               "since": str(clock.time() - 130)})
    monkeypatch.setattr(registry, "LEASE_WAIT_S", 1.0)
    with pytest.raises(registry.RegistryError, match="another promotion holds the registry lease"):
        registry.promote(NAME, "3", "must wait for a live holder")
    monkeypatch.setattr(registry, "LEASE_STALE_S", 0.3)  # its heartbeat stopped: broken once unchanged that long
    registry.promote(NAME, "3", "after its heartbeat stopped")
    assert registry.version_by_alias(NAME, registry.CHAMPION) == "3"
    client.create_registered_model(lock, tags={"token": "theirs", "since": str(clock.time())})
    registry._delete_lease(client, lock, "mine")  # not this process's lease: left alone
    assert client.get_registered_model(lock).tags["token"] == "theirs"
    registry._delete_lease(client, lock, "theirs")
    assert not client.search_registered_models(f"name = '{lock}'")


def test_a_reused_pid_does_not_hold_a_dead_holders_lease_and_one_waiter_reaps_it(store):
    client, lock = MlflowClient(), f"{registry.LEASE_PREFIX}{NAME}"
    here = where()  # this machine, a live pid (ours), but another process's start time: the pid reused
    client.create_registered_model(lock, tags={**here, "pid": str(os.getpid()), "pid_start": "1", "token": "dead",
                                               "since": str(time.time())})
    assert registry._holder_gone(client.get_registered_model(lock).tags, 0.0)
    assert not registry._holder_gone({**here, "pid": str(os.getpid()), "pid_start": started("self")}, 0.0)
    client.create_registered_model(f"{lock}.reap.dead")  # another waiter is breaking it: this one backs off
    registry._reap(client, lock, "dead", 0.0)
    assert client.get_registered_model(lock).tags["token"] == "dead"
    registry._reap(client, lock, "dead", 2 * registry.LEASE_STALE_S + 1)  # that waiter died: its marker goes
    assert not client.search_registered_models(f"name = '{lock}.reap.dead'")
    registry.promote(NAME, "2", "after the dead holder's lease was broken")
    assert registry.version_by_alias(NAME, registry.CHAMPION) == "2"
    assert not client.search_registered_models(f"name LIKE '{lock}%'"), "no lease and no marker left"


def test_an_interrupted_promote_does_not_undo_a_later_move_by_hand(store):
    p = _in_subprocess(f"registry.promote({NAME!r}, '2', 'killed midway', expected_champion='1')", KFTUNE_FAULT="intent")
    p.communicate(timeout=120)
    MlflowClient().set_registered_model_alias(NAME, registry.CHAMPION, "4")  # a person, in the MLflow UI
    done = registry.reconcile(NAME)
    assert done[0] == "dropped an interrupted promote: the champion was moved to v4 since"
    assert registry.version_by_alias(NAME, registry.CHAMPION) == "4" and registry.check(NAME) == []


def test_a_failed_prune_after_a_promotion_does_not_fail_it(store, monkeypatch, caplog):
    from kftune import gate

    def unreachable(name, keep):
        raise OSError("the artifact store is unreachable")

    monkeypatch.setattr(registry, "prune", unreachable)  # S3 down between the promotion and the cleanup
    assert gate.promote(NAME, "2", "better", keep_versions=2).to_version == "2"
    assert registry.version_by_alias(NAME, registry.CHAMPION) == "2" and "pruning failed" in caplog.text


def test_an_alias_moved_outside_kftune_is_detected_and_recorded(store):
    MlflowClient().set_registered_model_alias(NAME, registry.CHAMPION, "4")  # MLflow UI's alias editor
    assert any("moved outside kftune" in p for p in registry.check(NAME))
    assert "champion moved outside kftune: v1 -> v4; recorded" in registry.reconcile(NAME)
    assert registry.history(NAME)[-1].action == "moved-outside-kftune"
    assert registry.check(NAME) == []
    assert MlflowClient().get_model_version(NAME, "4").tags["kftune.promoted_by"] == "outside kftune"


def test_the_history_keeps_the_order_of_moves_whatever_the_writers_clocks(store, monkeypatch):
    """A promotion from a machine whose clock is an hour fast, then one from a machine on time: ordered by
    time, the history's last move would be the first one, and the champion would read as moved outside kftune."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    registry.promote(NAME, "2", "from a fast clock")
    monkeypatch.setattr(time, "time", real)
    registry.promote(NAME, "3", "from a clock on time")
    moves = [e for e in registry.history(NAME) if e.action == "promote"]
    assert [e.to_version for e in moves] == ["1", "2", "3"] and moves[1].time > moves[2].time
    assert [e.seq for e in moves] == sorted(e.seq for e in moves)
    assert registry.check(NAME) == [] and registry.reconcile(NAME) == []


def test_listing_a_consistent_registry_neither_writes_nor_waits_for_a_held_lease(store, capsys):
    from kftune.cli import main

    holder = _in_subprocess(f"import time\nwith registry.lease({NAME!r}):\n    print('held', flush=True)\n"
                            f"    time.sleep(60)")
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        assert main(["models", "list", "--name", NAME]) == 0
        assert time.monotonic() - started < registry.LEASE_WAIT_S, "list waited for another command's lease"
        assert "champion" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.communicate(timeout=60)


def test_models_check_reports_and_repairs(store, capsys):
    from kftune.cli import main

    p = _in_subprocess(f"registry.promote({NAME!r}, '2', 'killed')", KFTUNE_FAULT="previous")
    p.communicate(timeout=120)
    assert main(["models", "check", "--name", NAME]) == 1
    assert "an unfinished promote v1 -> v2" in capsys.readouterr().out
    assert main(["models", "check", "--name", NAME, "--repair"]) == 0
    out = capsys.readouterr().out
    assert "repaired: finished an interrupted promote: v1 -> v2" in out and f"{NAME}: consistent" in out


def test_keep_versions_prunes_after_each_promotion_but_never_a_protected_version(store, tmp_path):
    import json

    from components.promote import promote_op
    from kftune.config import ConfigError, load_params
    from tests.conftest import ROOT

    client = MlflowClient()
    client.set_registered_model_alias(NAME, registry.CHALLENGER, "5")
    client.set_model_version_tag(NAME, "6", "kftune.decision", "awaiting-approval")
    params = load_params(ROOT / "params.yaml", [f"register.model_name={NAME}", "register.keep_versions=1"])
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "decision.json").write_text(json.dumps(
        {"decision": "promote", "version": "3", "champion_version": "1", "reasons": ["test"]}))

    class Gate:
        path = str(tmp_path / "gate")

    promote_op.python_func(params=params.to_dict(), gate=Gate(), run_name="keep-test")
    left = [str(mv.version) for mv in client.search_model_versions(f"name='{NAME}'")]
    # champion v3, previous-champion v1, challenger v5, v6 awaiting approval; of v2 and v4 the newest stays
    assert sorted(left, key=int) == ["1", "3", "4", "5", "6"]
    _consistent()
    with pytest.raises(ConfigError, match=r"register.keep_versions=-1: must be >= 0"):
        load_params(ROOT / "params.yaml", ["register.keep_versions=-1"])


def test_a_refused_promotion_is_recorded_on_the_retraining_run(store, tmp_path):
    """The retraining run said "promote" at register; the champion moved before promote ran."""
    import json

    from components.promote import promote_op
    from kftune.config import load_params
    from kftune.steps.resolve import start_retraining_run
    from tests.conftest import ROOT

    params = load_params(ROOT / "params.yaml", [f"register.model_name={NAME}"])
    run_id = start_retraining_run(params)
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "decision.json").write_text(json.dumps(
        {"decision": "promote", "version": "3", "champion_version": "", "reasons": ["test"], "retrain_run_id": run_id}))

    class Gate:
        path = str(tmp_path / "gate")

    with pytest.raises(registry.RegistryError, match="champion moved"):
        promote_op.python_func(params=params.to_dict(), gate=Gate(), run_name="refused-test")
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["kftune.decision"] == "refused" and "champion moved: was vnone" in tags["kftune.refusal"]
    assert registry.version_by_alias(NAME, registry.CHAMPION) == "1"
    _consistent()


def test_prune_finishes_an_interrupted_move_first_and_an_intent_for_a_deleted_version_is_dropped(store):
    """A promotion killed after the champion alias moved: the old champion has no alias yet, and prune must not
    take it for an unprotected version. An intent whose target was deleted meanwhile must not wedge every
    later command."""
    p = _in_subprocess(f"registry.promote({NAME!r}, '2', 'killed midway', expected_champion='1')",
                       KFTUNE_FAULT="champion")
    p.communicate(timeout=120)
    assert registry.prune(NAME, keep=1) == ["3", "4", "5"]  # v6 the newest; v1 is previous-champion again
    assert registry.version_by_alias(NAME, registry.PREVIOUS) == "1"
    _consistent()

    p = _in_subprocess(f"registry.promote({NAME!r}, '6', 'killed midway', expected_champion='2')",
                       KFTUNE_FAULT="intent")
    p.communicate(timeout=120)
    MlflowClient().delete_model_version(NAME, "6")  # deleted before anything replayed the intent
    assert registry.reconcile(NAME) == ["dropped an interrupted promote: v6 no longer exists"]
    assert registry.version_by_alias(NAME, registry.CHAMPION) == "2" and registry.history(NAME)[-1].action == "refuse"
    registry.rollback(NAME, "the next move works")
    _consistent()
