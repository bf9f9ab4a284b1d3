"""Champion/challenger bookkeeping on MLflow registry aliases, with an append-only promotion history.

The history is an MLflow experiment with one finished run per event, so it lives wherever the
registry lives (sqlite locally, PostgreSQL on a cluster) and concurrent writers never clash.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import socket
import threading
import time
import uuid
from pathlib import Path
from dataclasses import dataclass

from kftune.config import KftuneError
from kftune.processes import started, where

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous-champion", "challenger"
TAG = "kftune."
LORA_BASE, LORA_BASE_SHA256 = f"{TAG}lora_base", f"{TAG}lora_base_sha256"  # a LoRA version's base, as registered


class RegistryError(KftuneError):
    pass


def actor() -> str:
    return os.environ.get("KFTUNE_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def version_by_alias(name: str, alias: str) -> str | None:
    """The model version number behind `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def history_experiment(name: str) -> str:
    from kftune.tracking import experiment_id

    return experiment_id(f"kftune-history-{name}")


@dataclass
class Event:
    action: str  # promote | hold | awaiting-approval | rollback | refuse
    model: str
    from_version: str | None
    to_version: str | None
    reason: str
    actor: str
    time: float  # the writer's clock: shown, never used to order
    seq: int = 0  # the history's order: one more than the last event's (moves write it under the lease)


def record(action: str, name: str, from_version, to_version, reason: str, who: str | None = None,
           intent_id: str = "") -> Event:
    """Add an event to the history. Its place is `seq`, not its time: writers' clocks differ, and a fast one
    would put an older move last (and the next command would report the champion as moved outside kftune)."""
    earlier = _history_runs(name)
    event = Event(action, name, str(from_version) if from_version else None,
                  str(to_version) if to_version else None, reason, who or actor(), time.time(),
                  earlier[-1][0].seq + 1 if earlier else 1)
    tags = {f"{TAG}{k}": str(v)[:5000] for k, v in vars(event).items() if v is not None}
    if intent_id:
        tags[f"{TAG}intent_id"] = intent_id
    client = _client()
    run = client.create_run(history_experiment(name), run_name=f"{action} {event.to_version or ''}".strip(), tags=tags)
    client.set_terminated(run.info.run_id)
    return event


def history(name: str) -> list[Event]:
    return [e for e, _ in _history_runs(name)]


def _history_runs(name: str) -> list[tuple[Event, str]]:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:  # every event, a page at a time (one page would be the oldest 10,000)
        page = _client().search_runs([history_experiment(name)], run_view_type=ViewType.ACTIVE_ONLY,
                                     order_by=["attributes.start_time ASC"], max_results=5000, page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    out = []
    for run in runs:
        t = {k.removeprefix(TAG): v for k, v in run.data.tags.items() if k.startswith(TAG)}
        out.append((Event(t["action"], t["model"], t.get("from_version"), t.get("to_version"), t["reason"],
                          t["actor"], float(t["time"]), int(t.get("seq", 0))), t.get("intent_id", "")))
    return sorted(out, key=lambda pair: (pair[0].seq, pair[0].time))  # events from before seq (0) by time, first


# --- serialised, crash-consistent alias moves ---------------------------------------------------
#
# Every move of `champion` (promote, approve, rollback) runs under a lease and between an intent
# and its completion. The lease is a registered model `kftune-lease.<name>`: a registered model
# name can exist only once in every MLflow store (sqlite, PostgreSQL, through a tracking server),
# so creating it is an atomic test-and-set that needs nothing but the registry itself. The intent
# (a tag on the registered model) says what the move is; every command that touches the registry
# first finishes an intent left by a killed process, so aliases, tags and history always agree.

LEASE_PREFIX, INTENT = "kftune-lease.", f"{TAG}intent"
LEASE_STALE_S = 120.0  # a holder that cannot be checked (another host or container): dead once its heartbeat has
# not changed for this long, on the waiter's own clock (the holder's clock may be off by more than this)
LEASE_ABANDONED_S = 3600.0  # ... or at once when the heartbeat is this old by the waiter's clock
LEASE_WAIT_S = LEASE_STALE_S + 30.0  # so a waiter outlives a dead holder's lease rather than failing first


def _fault(point: str) -> None:
    """Tests kill the process between two registry writes: KFTUNE_FAULT=<point>."""
    if os.environ.get("KFTUNE_FAULT") == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _holder_gone(tags: dict, unchanged_for: float) -> bool:
    """A holder this process can see (same host, boot and pid namespace) is gone when its process is (its pid
    reused by another process counts as gone); any other when its heartbeat has not changed for LEASE_STALE_S
    as this waiter saw it (`unchanged_for` seconds so far), or is LEASE_ABANDONED_S old."""
    here = where()
    if all(tags.get(k, "") == here[k] for k in ("host", "pid_namespace", "boot")) and tags.get("pid", "").isdigit():
        if Path("/proc/self/stat").exists():  # Linux: /proc says whether that process, not only its pid, lives
            began = started(tags["pid"])
            return not began or bool(tags.get("pid_start")) and began != tags["pid_start"]
        try:
            os.kill(int(tags["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False
    return unchanged_for > LEASE_STALE_S or time.time() - float(tags.get("since", "0")) > LEASE_ABANDONED_S


def _reap(client, lock: str, token: str, unchanged_for: float) -> None:
    """Delete a dead holder's lease, one waiter at a time: two waiters that both saw it dead must not both delete,
    or the second would delete the lease the first has taken meanwhile. The waiter that creates the marker model
    reaps; the others go back to waiting, and remove a marker whose lease stays unbroken for 2 x LEASE_STALE_S
    (its reaper died)."""
    from mlflow.exceptions import MlflowException

    marker = f"{lock}.reap.{token or 'untokened'}"
    try:
        client.create_registered_model(marker, description="kftune: breaking a dead holder's registry lease")
    except MlflowException:
        if unchanged_for > 2 * LEASE_STALE_S:
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(marker)
        return
    try:
        _delete_lease(client, lock, token)
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(marker)


def _delete_lease(client, lock: str, token: str) -> None:
    """Delete the lease only while it is still the one with `token` (another holder's is left alone)."""
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        if client.get_registered_model(lock).tags.get("token", "") == token:  # "": a lease from before tokens
            client.delete_registered_model(lock)


@contextlib.contextmanager
def lease(name: str):
    """Hold the registry lease of `name` while the block runs (waits up to LEASE_WAIT_S)."""
    from mlflow.exceptions import MlflowException

    client, lock, token = _client(), f"{LEASE_PREFIX}{name}", uuid.uuid4().hex
    deadline = time.monotonic() + LEASE_WAIT_S
    first_seen: dict[tuple, float] = {}  # a holder's (token, heartbeat) -> when this waiter first saw it
    while True:
        try:
            client.create_registered_model(lock, description=f"kftune: held while {name}'s champion moves",
                                           tags={**where(), "pid": str(os.getpid()), "pid_start": started("self"),
                                                 "actor": actor(), "since": str(time.time()), "token": token})
            break
        except MlflowException:
            try:
                holder = client.get_registered_model(lock).tags
            except MlflowException as exc:  # released in between (try again), or the store refuses both calls
                if time.monotonic() > deadline:
                    raise RegistryError(f"{name}: cannot take the registry lease {lock}: {exc}") from None
                time.sleep(0.05)
                continue
            seen = first_seen.setdefault((holder.get("token", ""), holder.get("since", "")), time.monotonic())
            if _holder_gone(holder, time.monotonic() - seen):
                _reap(client, lock, holder.get("token", ""), time.monotonic() - seen)
                continue
            if time.monotonic() > deadline:
                raise RegistryError(f"{name}: another promotion holds the registry lease ({holder.get('actor')}, "
                                    f"pid {holder.get('pid')} on {holder.get('host')}); try again") from None
            time.sleep(0.05 + random.random() * 0.2)
    beating = threading.Event()

    def heartbeat():  # a long block (prune on S3) stays fresh for waiters that judge it by age
        while not beating.wait(max(LEASE_STALE_S / 4, 1.0)):
            with contextlib.suppress(Exception):
                _client().set_registered_model_tag(lock, "since", str(time.time()))

    beat = threading.Thread(target=heartbeat, name="kftune-lease-heartbeat", daemon=True)
    beat.start()
    try:
        yield
    finally:
        beating.set()
        beat.join(10)  # no beat lands on the next holder's lease
        _delete_lease(client, lock, token)


def _intent(name: str) -> dict | None:
    tags = _client().get_registered_model(name).tags
    return json.loads(tags[INTENT]) if INTENT in tags else None


def _apply(name: str, intent: dict) -> Event:
    """Carry out an intent; every write is idempotent, so a half-done one is simply done again."""
    client, to, old = _client(), intent["to"], intent["from"]
    client.set_registered_model_alias(name, CHAMPION, to)
    _fault("champion")
    if intent["action"] == "promote":
        if old:
            client.set_registered_model_alias(name, PREVIOUS, old)
        _fault("previous")
        client.set_model_version_tag(name, to, f"{TAG}decision", "promoted")
        client.set_model_version_tag(name, to, f"{TAG}promoted_by", intent["actor"])
    else:  # rollback
        with contextlib.suppress(Exception):
            client.delete_registered_model_alias(name, PREVIOUS)
        _fault("previous")
        if old:
            client.set_model_version_tag(name, old, f"{TAG}decision", "rolled-back")
    _fault("tags")
    done = [e for e, iid in _history_runs(name) if iid == intent["id"]]
    event = done[0] if done else record(intent["action"], name, old, to, intent["reason"], intent["actor"],
                                        intent["id"])
    _fault("history")
    client.delete_registered_model_tag(name, INTENT)
    return event


def _move(name: str, action: str, to: str, old: str, reason: str, who: str | None) -> Event:
    intent = {"id": uuid.uuid4().hex, "action": action, "to": str(to), "from": str(old or ""), "reason": reason,
              "actor": who or actor(), "time": time.time()}
    _client().set_registered_model_tag(name, INTENT, json.dumps(intent))
    _fault("intent")
    return _apply(name, intent)


def reconcile(name: str) -> list[str]:
    """Finish a move a killed process left half done, and adopt an alias moved outside kftune (recording
    it in the history). Returns what was done; nothing to do for a model not registered yet."""
    from mlflow.exceptions import MlflowException

    try:
        _client().get_registered_model(name)
    except MlflowException:
        return []
    if not _intent(name) and not _outside_move(name):
        return []  # consistent: a read-only command writes nothing and never waits for another's lease
    with lease(name):
        return _reconcile(name)  # looks again under the lease: a live move may have finished meanwhile


def _exists(name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        _client().get_model_version(name, version)
    except MlflowException:
        return False
    return True


def _reconcile(name: str) -> list[str]:
    done = []
    if intent := _intent(name):
        now = version_by_alias(name, CHAMPION) or ""
        if intent["from"] and not _exists(name, intent["from"]):  # deleted since: nothing to keep as previous
            intent = dict(intent, **{"from": ""})
        if not _exists(name, intent["to"]):  # deleted since: replaying it would fail at every later command
            _client().delete_registered_model_tag(name, INTENT)
            record("refuse", name, intent["from"] or None, intent["to"], f"an interrupted {intent['action']} "
                   f"to v{intent['to']} was dropped: that version no longer exists")
            done.append(f"dropped an interrupted {intent['action']}: v{intent['to']} no longer exists")
        elif now in (intent["from"], intent["to"]):  # where the interrupted move left it
            event = _apply(name, dict(intent, reason=intent["reason"] + " (completed after an interruption)"))
            done.append(f"finished an interrupted {event.action}: v{event.from_version or '-'} -> "
                        f"v{event.to_version}")
        else:  # moved by hand since: a person's choice is not overridden by an old intent
            _client().delete_registered_model_tag(name, INTENT)
            record("refuse", name, intent["from"] or None, intent["to"], f"an interrupted {intent['action']} "
                   f"(v{intent['from'] or '-'} -> v{intent['to']}) was dropped: the champion is v{now or '-'} now")
            done.append(f"dropped an interrupted {intent['action']}: the champion was moved to v{now or '-'} since")
    if moved := _outside_move(name):
        if moved[1]:
            _client().set_model_version_tag(name, moved[1], f"{TAG}decision", "promoted")
            _client().set_model_version_tag(name, moved[1], f"{TAG}promoted_by", "outside kftune")
        record("moved-outside-kftune", name, moved[0], moved[1], "the champion alias was moved outside kftune "
               "(MLflow UI or API); adopted as it is", "unknown (outside kftune)")
        done.append(f"champion moved outside kftune: v{moved[0] or '-'} -> v{moved[1] or '-'}; recorded")
    return done


def _outside_move(name: str) -> tuple[str, str] | None:
    """(expected, actual) champion when the alias disagrees with the history's last move."""
    moves = [e for e in history(name) if e.action in ("promote", "rollback", "moved-outside-kftune")]
    expected = moves[-1].to_version or "" if moves else ""
    actual = version_by_alias(name, CHAMPION) or ""
    return (expected, actual) if expected != actual else None


def check(name: str) -> list[str]:
    """Every disagreement between aliases, version tags and the history (empty: consistent, or not registered)."""
    from mlflow.exceptions import MlflowException

    try:
        _client().get_registered_model(name)
    except MlflowException:
        return []
    problems = []
    if intent := _intent(name):
        problems.append(f"an unfinished {intent['action']} v{intent['from'] or '-'} -> v{intent['to']} "
                        f"by {intent['actor']}")
    if moved := _outside_move(name):
        problems.append(f"champion is v{moved[1] or '-'} but the history's last move is to v{moved[0] or '-'} "
                        f"(moved outside kftune?)")
    champion = version_by_alias(name, CHAMPION)
    if champion and not intent:
        decision = _client().get_model_version(name, champion).tags.get(f"{TAG}decision")
        if decision != "promoted":
            problems.append(f"champion v{champion} is tagged decision={decision!r}, not 'promoted'")
        last = [e for e in history(name) if e.action in ("promote", "rollback")]
        previous = version_by_alias(name, PREVIOUS) or ""
        if last and last[-1].action == "promote" and (last[-1].from_version or "") != previous:
            problems.append(f"previous-champion is v{previous or '-'} but the last promotion came from "
                            f"v{last[-1].from_version or '-'}")
    return problems


def promote(name: str, version: str, reason: str, who: str | None = None, expected_champion: str | None = "any"):
    """Make `version` champion; the old champion becomes previous-champion.

    Args:
        expected_champion: the champion the decision was made against ("" for none); if the champion
            moved meanwhile (another run promoted), refuse rather than overwrite a newer decision.
    """
    client = _client()
    client.get_model_version(name, str(version))  # raises with MLflow's message if it does not exist
    with lease(name):
        _reconcile(name)
        client.get_model_version(name, str(version))  # again: a prune may have deleted it while we waited
        current = version_by_alias(name, CHAMPION) or ""
        if expected_champion != "any" and str(expected_champion or "") != current:
            why = (f"champion moved: was v{expected_champion or 'none'} when the gate ran, now v{current or 'none'}; "
                   f"re-run the gate against the new champion")
            record("refuse", name, current, version, why, who)
            raise RegistryError(why)
        if current == str(version):
            raise RegistryError(f"{name} v{version} is already the champion")
        return _move(name, "promote", str(version), current, reason, who)


def rollback(name: str, reason: str, who: str | None = None) -> Event:
    """Point champion back at previous-champion; the demoted version is tagged rolled-back."""
    with lease(name):
        _reconcile(name)
        current, previous = version_by_alias(name, CHAMPION), version_by_alias(name, PREVIOUS)
        if previous is None:
            raise RegistryError(f"{name} has no {PREVIOUS} to roll back to; use `kftune models promote VERSION`")
        return _move(name, "rollback", previous, current or "", reason, who)


def list_versions(name: str) -> list[dict]:
    import mlflow

    client = _client()
    if not client.search_registered_models(f"name='{name}'"):
        raise RegistryError(f"no registered model {name!r} in {mlflow.get_tracking_uri()} yet; "
                            f"`kftune run` registers one")
    aliases: dict[str, list[str]] = {}
    for alias, v in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(v), []).append(alias)
    out = []
    for mv in client.search_model_versions(f"name='{name}'", order_by=["version_number ASC"]):
        out.append({"version": str(mv.version), "aliases": sorted(aliases.get(str(mv.version), [])),
                    "decision": mv.tags.get(f"{TAG}decision", ""),
                    "score": mv.tags.get(f"{TAG}test_macro_f1") or mv.tags.get(f"{TAG}test_entity_f1", ""),
                    "created": mv.creation_timestamp, "run_id": mv.run_id})
    return out


def describe_version(name: str, version: str) -> str:
    """A version's decision, metrics and lineage, and the commands that reproduce it."""
    mv = _client().get_model_version(name, version)
    t = {k.removeprefix(TAG): v for k, v in mv.tags.items() if k.startswith(TAG)}
    lines = [f"{name} v{version}  (run {mv.run_id})"]
    for key in ("decision", "test_macro_f1", "test_entity_f1", "compared_with", "reference_score", "reasons",
                "held_by", "historical_macro_f1", "warm_start", "retrain_run_id", "git_commit",
                "params_hash", "data_sha256", "data_repo", "data_rev", "data_commit", "data_path", "dvc_md5"):
        if t.get(key):
            lines.append(f"  {key:<19} {t[key]}")
    lines += ["", "reproduce:"]
    commit = t.get("git_commit", "unknown").removesuffix("-dirty")
    if commit != "unknown":
        lines.append(f"  git checkout {commit}")
    if t.get("data_commit"):
        lines.append(f"  dvc pull {t['data_path']}.dvc   # optional: fetches the data for local inspection")
    lines.append(f"  mlflow artifacts download --run-id {mv.run_id} --artifact-path params.yaml --dst-path .")
    data = f"--data {t.get('data_path', '?')}"
    if t.get("data_commit"):
        repo = f" --data-repo {t['data_repo']}" if t.get("data_repo") else ""
        data += f" --data-rev {t['data_commit']}{repo}"
    lines.append(f"  kftune run {data} --params params.yaml")
    if t.get("git_commit", "").endswith("-dirty"):
        lines.append("  (warning: the code had uncommitted changes when this version was trained)")
    return "\n".join(lines)


def logged_model_id(mv) -> str | None:
    """The MLflow 3 logged model behind a version (its `source` is models:/m-..., model_id may be unset)."""
    if mv.model_id:
        return mv.model_id
    return mv.source.removeprefix("models:/") if str(mv.source).startswith("models:/m-") else None


def prune(name: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions, with their weights; never a version behind an alias
    (champion, previous-champion, challenger) nor one awaiting approval. Returns the versions deleted."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = _client()
    if keep < 1:
        raise RegistryError(f"--keep {keep}: keep at least 1 version")
    with lease(name):
        _reconcile(name)  # an interrupted move first: its versions must not be pruned from under it
        protected = {str(v) for v in client.get_registered_model(name).aliases.values()}
        versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))
        protected |= {str(mv.version) for mv in versions if mv.tags.get(f"{TAG}decision") == "awaiting-approval"}
        candidates = [mv for mv in versions if str(mv.version) not in protected]
        doomed = candidates[: max(len(candidates) - keep, 0)]
        for mv in doomed:
            model_id = logged_model_id(mv)
            location = client.get_logged_model(model_id).artifact_location if model_id else None
            client.delete_model_version(name, mv.version)
            if location:
                get_artifact_repository(location).delete_artifacts()
                client.delete_logged_model(model_id)
    return [str(mv.version) for mv in doomed]


def load_components(uri: str) -> dict:
    """mlflow.transformers components of models:/<name>/<version>, a LoRA version's adapters merged into its
    weights; when they cannot be loaded (a truncated model.safetensors, a deleted file), the error names the
    version and the file that is broken."""
    import mlflow

    from kftune.lora import merged

    _check_lora_base(uri)
    try:
        parts = mlflow.transformers.load_model(uri, return_type="components")
        parts["model"] = merged(parts["model"])
        return parts
    except Exception as exc:  # noqa: BLE001  (safetensors, OSError, MlflowException: all mean "unreadable")
        name, _, version = uri.removeprefix("models:/").rpartition("/")
        raise RegistryError(f"cannot load {name} v{version} ({uri}): {_broken_file(name, version) or 'its files'}: "
                            f"{type(exc).__name__}: {str(exc)[:300]}; restore the file, or move champion to a "
                            f"readable version (`kftune models rollback` / `kftune models promote VERSION`)") from None


def _check_lora_base(uri: str) -> None:
    """A LoRA version loads its base from a path: refuse when the weights there are not the ones it was trained
    on (a base package upgraded under it), which would load without an error and predict wrongly."""
    from kftune.lora import weights_digest

    name, _, version = uri.removeprefix("models:/").rpartition("/")
    if not (uri.startswith("models:/") and version.isdigit()):
        return
    tags = _client().get_model_version(name, version).tags
    if not (expected := tags.get(LORA_BASE_SHA256)):
        return  # a full model, or a LoRA version registered before the digest was recorded
    base = tags.get(LORA_BASE, "")
    if not Path(base).is_dir():
        raise RegistryError(f"{name} v{version} is a LoRA adapter over the base model folder {base}, which this "
                            f"machine does not have: load it where it was registered, or register the model in full "
                            f"(finetune.method=full)")
    if (now := weights_digest(base)) != expected:
        what = f"now {now[:12]}" if now else "now missing"
        raise RegistryError(f"{name} v{version} is a LoRA adapter over the base model at {base}, whose weights "
                            f"changed since it was registered (sha256 {expected[:12]}, {what}): the adapter would "
                            f"load onto other weights. Restore that base (the package version it came from), or "
                            f"train and register the model again")


def _broken_file(name: str, version: str) -> str:
    """The first weights or config file of a version that does not read back whole ('' if none is found)."""
    import tempfile
    from pathlib import Path

    import mlflow
    from safetensors import safe_open

    try:
        mv = _client().get_model_version(name, version)
        model_id = logged_model_id(mv)  # else a version registered from a path: its source is the folder
        location = _client().get_logged_model(model_id).artifact_location if model_id else mv.source
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp))
            for f in sorted(root.rglob("*.safetensors")) + sorted(root.rglob("config.json")):
                try:
                    if f.suffix == ".safetensors":
                        with safe_open(str(f), "pt") as st:
                            for key in st.keys():
                                st.get_slice(key)[:]
                    else:
                        json.loads(f.read_text())
                except Exception:  # noqa: BLE001
                    return f"{location.rstrip('/')}/{f.relative_to(root)}"
    except Exception:  # noqa: BLE001  (the version itself is gone: the caller's message says enough)
        return ""
    return ""
