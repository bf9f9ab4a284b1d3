"""Champion/challenger bookkeeping on MLflow registry aliases, with an append-only promotion history.

The history is an MLflow experiment with one finished run per event, so it lives wherever the
registry lives (sqlite locally, PostgreSQL on a cluster) and concurrent writers never clash.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from dataclasses import dataclass

from kftune.config import KftuneError

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous-champion", "challenger"
TAG = "kftune."


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
    time: float


def record(action: str, name: str, from_version, to_version, reason: str, who: str | None = None) -> Event:
    event = Event(action, name, str(from_version) if from_version else None,
                  str(to_version) if to_version else None, reason, who or actor(), time.time())
    client = _client()
    run = client.create_run(history_experiment(name), run_name=f"{action} {event.to_version or ''}".strip(),
                            tags={f"{TAG}{k}": str(v)[:5000] for k, v in vars(event).items() if v is not None})
    client.set_terminated(run.info.run_id)
    return event


def history(name: str) -> list[Event]:
    from mlflow.entities import ViewType

    runs = _client().search_runs([history_experiment(name)], run_view_type=ViewType.ACTIVE_ONLY,
                                 order_by=["attributes.start_time ASC"], max_results=10000)
    events = []
    for run in runs:
        t = {k.removeprefix(TAG): v for k, v in run.data.tags.items() if k.startswith(TAG)}
        events.append(Event(t["action"], t["model"], t.get("from_version"), t.get("to_version"), t["reason"],
                            t["actor"], float(t["time"])))
    return sorted(events, key=lambda e: e.time)


def promote(name: str, version: str, reason: str, who: str | None = None, expected_champion: str | None = "any"):
    """Make `version` champion; the old champion becomes previous-champion.

    Args:
        expected_champion: the champion the decision was made against ("" for none); if the champion
            moved meanwhile (another run promoted), refuse rather than overwrite a newer decision.
    """
    client = _client()
    client.get_model_version(name, str(version))  # raises with MLflow's message if it does not exist
    current_v = version_by_alias(name, CHAMPION) or ""
    if expected_champion != "any" and str(expected_champion or "") != str(current_v):
        why = (f"champion moved from v{expected_champion or 'none'} to v{current_v} since the gate ran; "
               f"re-run the gate against the new champion")
        record("refuse", name, current_v, version, why, who)
        raise RegistryError(why)
    if str(current_v) == str(version):
        raise RegistryError(f"{name} v{version} is already the champion")
    # champion first: if anything after it fails, users still get the promoted model.
    # Two promotions racing between the check above and this line are not prevented.
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if current_v:
        client.set_registered_model_alias(name, PREVIOUS, current_v)
    client.set_model_version_tag(name, str(version), f"{TAG}decision", "promoted")
    client.set_model_version_tag(name, str(version), f"{TAG}promoted_by", who or actor())
    return record("promote", name, current_v, version, reason, who)


def rollback(name: str, reason: str, who: str | None = None) -> Event:
    """Point champion back at previous-champion; the demoted version is tagged rolled-back."""
    client = _client()
    current, previous = version_by_alias(name, CHAMPION), version_by_alias(name, PREVIOUS)
    if previous is None:
        raise RegistryError(f"{name} has no {PREVIOUS} to roll back to; use `kftune models promote VERSION`")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    if current:
        client.set_model_version_tag(name, current, f"{TAG}decision", "rolled-back")
    return record("rollback", name, current, previous, reason, who)


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
