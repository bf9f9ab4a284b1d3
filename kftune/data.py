"""Versioned data: batches added with DVC + git, and read back at any revision through dvc.api."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from kftune.config import IngestConfig, KftuneError

log = logging.getLogger(__name__)

DATASET = "data/dataset"  # the versioned dataset: one file per batch, tracked by data/dataset.dvc


class DataVersionError(KftuneError):
    """git or DVC refused; the message says which command and why."""


def _tool(name: str) -> str:
    beside = Path(sys.executable).with_name(name)  # the dvc of this environment, not another one on PATH
    return str(beside) if beside.exists() else name


def _run(cmd: list[str], cwd: Path) -> str:
    # DVC's usage analytics would phone home from every repository (the demo's too), not only this one
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if proc.returncode:
        shown = " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd))
        said = (proc.stderr or proc.stdout).strip() or f"exit code {proc.returncode}"
        raise DataVersionError(f"`{shown}` failed in {cwd}: {said}")
    return proc.stdout.strip()


def _git(root: Path, *args: str) -> str:
    return _run(["git", *args], root)


def _dvc(root: Path, *args: str) -> str:
    return _run([_tool("dvc"), *args], root)


def check_batch(path: str | Path, cfg: IngestConfig, task: str = "sequence-classification") -> int:
    """Run ingest's checks on one batch file (tagged sentences: CoNLL or JSONL with IOB2 checks); return its
    usable rows or raise DataError."""
    from kftune.tables import DataError, check_labels, clean, read_sentences, read_tables

    if task == "token-classification":
        df, drops = clean(read_sentences(str(path), cfg)[0])
        if df.empty:
            raise DataError(f"{path}: no usable sentences after cleaning (dropped {drops})")
        return len(df)
    df, drops = clean(read_tables(str(path), cfg)[0])
    if df.empty:
        raise DataError(f"{path}: no usable rows after cleaning (dropped {drops})")
    check_labels(df, cfg, str(path), min_labels=1)  # a batch of one label is fine; ingest checks the dataset
    return len(df)


def _refuse_duplicates(files: list[str], target: Path) -> None:
    """The same file added twice would be a new data version with nothing new in it."""
    from kftune.fileio import file_sha256
    from kftune.tables import DataError

    known = {file_sha256(p): p.name for p in target.iterdir() if p.is_file()} if target.is_dir() else {}
    for f in files:
        if (d := file_sha256(f)) in known:
            raise DataError(f"{f}: the same bytes are already in the dataset as {known[d]}; nothing to add")
        known[d] = str(f)


def has_remote(root: Path) -> bool:
    return bool(_dvc(root, "remote", "list").strip())


def add_batches(files: list[str], root: str | Path, cfg: IngestConfig, dataset: str = DATASET,
                tag: str | None = None, push: bool = True, task: str = "sequence-classification") -> dict:
    """Add labelled batches to the versioned dataset and record the new version.

    Every file is checked before anything changes; then each is copied in as the next
    batch-NNN file, `dvc add` tracks the folder, git commits the .dvc file (and tags it), and
    `dvc push` uploads when a remote is configured. If a step before the commit fails, the
    working tree is put back as it was.

    Returns:
        commit, tag, the files added, the dataset's DVC md5 and whether it was pushed.
    """
    from kftune import tables
    from kftune.fileio import single_instance

    root = Path(root).resolve()
    if not (root / ".dvc").is_dir():
        raise DataVersionError(f"{root}: not a DVC repository (run `dvc init` there)")
    rows = {str(f): check_batch(f, cfg, task) for f in files}
    # one `data add` at a time per repository: two would both number their batch batch-NNN, and the second
    # copy would overwrite the first (or its rollback delete the first's committed file)
    with single_instance(root / ".dvc" / "tmp" / "kftune-data-add.lock", "data add", wait=True):
        _refuse_duplicates(files, root / dataset)
        if tag and _run(["git", "tag", "--list", tag], root):
            raise DataVersionError(f"git tag {tag!r} already exists in {root}; choose another --tag")
        if tag and subprocess.run(["git", "check-ref-format", f"refs/tags/{tag}"], cwd=root).returncode:
            raise DataVersionError(f"--tag {tag!r}: not a valid git tag name (no spaces, '..', '~', '^', ':' ...)")
        target = root / dataset
        dvc_file = root / f"{dataset}.dvc"
        if dvc_file.exists() and json.loads(_dvc(root, "status", "--json", str(dvc_file.relative_to(root))) or "{}"):
            raise DataVersionError(f"{target}: the files differ from the version in {dvc_file.name} (not pulled, or "
                                   f"changed by hand); a new version from them would drop or change earlier batches. "
                                   f"Run `dvc pull` (or `dvc checkout`) there first")
        target.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for p in target.iterdir() if (m := re.match(r"batch-(\d+)", p.name))]
        start = max(numbers, default=-1) + 1
        meta = [dvc_file, dvc_file.parent / ".gitignore"]  # what `dvc add` writes and git commits
        paths = [str(p.relative_to(root)) for p in meta]
        before = {p: p.read_bytes() for p in meta if p.exists()}
        added = []
        try:
            for i, f in enumerate(files):
                suffix = Path(f).suffix.lower()
                if task == "token-classification" and suffix not in tables.NER_SUFFIXES:
                    suffix = ".conll"  # read as CoNLL when checked (one file, any name): so it is read in the folder
                dest = target / f"batch-{start + i:03d}{suffix}"
                shutil.copy2(f, dest)
                added.append(dest)
            # the new version as ingest will read it: a batch fine alone may not fit the others (a split column only
            # some files have); refused here, before it is committed
            (tables.load_sentences if task == "token-classification" else tables.load_rows)(str(target), cfg)
            _dvc(root, "add", dataset)
            _git(root, "add", "--", *paths)
            message = f"data: add {', '.join(p.name for p in added)} ({sum(rows.values())} rows)"
            _git(root, "commit", "-q", "-m", message, "--", *paths)
        except BaseException:  # Ctrl-C and SIGTERM too: a half-added batch would go into the next version unseen
            for p in added:
                p.unlink(missing_ok=True)
            for p in meta:
                if p in before:
                    p.write_bytes(before[p])
                else:
                    p.unlink(missing_ok=True)
            _git(root, "reset", "-q", "--", *paths)
            raise
        if tag:
            _git(root, "tag", tag)
        commit = _git(root, "rev-parse", "HEAD")
        pushed = False
        if push and has_remote(root):
            try:
                _dvc(root, "push", paths[0])
                pushed = True
            except DataVersionError as exc:
                raise DataVersionError(f"committed {commit[:10]} locally, but the push to the DVC remote failed (local "
                                       f"data is intact; run `dvc push` when the remote is reachable): {exc}") from None
        md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
        return {"commit": commit, "tag": tag, "files": [str(p.relative_to(root)) for p in added], "md5": md5,
                "pushed": pushed, "rows": rows}


def materialize(data_path: str, data_repo: str, data_rev: str, dest: str | Path) -> tuple[str, dict]:
    """Fetch `data_path` as it was at `data_rev` of `data_repo` (a path or git URL) into `dest`.

    With neither repo nor rev, the path is used as it is. Returns (local path, lineage), the
    lineage naming the resolved commit and the DVC md5 of the path.
    """
    if not data_repo and not data_rev:
        return data_path, {"data_path": data_path}
    from dvc.api import DVCFileSystem

    from kftune.tables import NER_SUFFIXES, READERS, DataError

    from dvc.repo.open_repo import clean_repos

    repo, rev = data_repo or ".", data_rev or "HEAD"  # the commit the lineage names, not the working tree
    try:
        fs = DVCFileSystem(repo, rev=rev)
        commit = fs.repo.scm.resolve_rev(rev)
    except Exception as exc:  # unknown revision, not a git/DVC repo, unreachable URL
        raise DataError(f"cannot read data repo {repo!r} at revision {rev!r}: {exc}") from None
    try:
        if not fs.exists(data_path):
            raise DataError(f"{data_path!r} does not exist at revision {rev!r} of data repo {repo!r}")
        local = Path(dest) / Path(data_path).name
        try:
            fs.get(data_path, str(local), recursive=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a fresh clone whose DVC cache was never pulled
            raise DataError(f"cannot fetch {data_path!r} at revision {rev!r} of data repo {repo!r} "
                            f"({type(exc).__name__}: {exc}); run `dvc pull` there, or check its DVC remote") from None
        if local.is_dir() and not any(p.suffix.lower() in {*READERS, *NER_SUFFIXES} for p in local.rglob("*")):
            raise DataError(f"{data_path!r} at revision {rev!r} holds no table or CoNLL/JSONL sentence files")
        lineage = {"data_repo": str(data_repo or Path(repo).resolve()), "data_rev": rev, "data_commit": commit,
                   "data_path": data_path}
        dvc_file = f"{data_path.rstrip('/')}.dvc"
        if fs.exists(dvc_file):
            lineage["dvc_md5"] = yaml.safe_load(fs.read_text(dvc_file))["outs"][0]["md5"]
        return str(local), lineage
    finally:
        fs.close()
        clean_repos()  # a git URL's clone and fetched cache, in temporary folders DVC keeps until told
