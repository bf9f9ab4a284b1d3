"""What a person sees while kfp.local runs a pipeline: one line per step, fine-tune progress, a summary.

kfp.local prints every task's executor input and everything the task writes. All of it goes to a
log file under the run's output folder; the terminal gets the lines a person needs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
STEP_LINE = re.compile(r"\]: ((?:ingest|resolve|drift|tokenize|fine-tune|evaluate|register|promote): .*)")
PROGRESS = re.compile(r"\]: ((?:fine-tune step \d+/\d+|[\w-]+: (?:[\w -]*: )?\d+/\d+ [^,]*,).*)")  # kftune.progress too
STARTED = re.compile(r"Executing task '([\w-]+)'")
FINISHED = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
SKIPPED = re.compile(r"Skipping (?:conditional )?task '?([\w-]+)'?")
PROGRESS_EVERY = 10.0  # seconds between two fine-tune progress lines on the terminal
CACHED = re.compile(r"Task '?([\w-]+)'? cache hit")


def plain(text: str) -> str:
    """Text safe for a terminal: no colour codes, no other control characters (tabs and newlines stay)."""
    return CONTROL.sub("", ANSI.sub("", text))


MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~&-])")
LINE_BREAKS = re.compile(r"[\n\r\x85\u2028\u2029]")  # what str.splitlines() splits on, besides the controls


def markdown_cell(text) -> str:
    """Data (a label name, a reason, a text) as inert Markdown: every character Markdown or HTML would read
    backslash-escaped (no link, emphasis, code, HTML or table break), on one line, no control characters."""
    return MD_SPECIAL.sub(r"\\\1", LINE_BREAKS.sub(" ", plain(str(text))).replace("\t", " "))


def code_span(text) -> str:
    """Data inside a Markdown code span, where neither escapes nor HTML are read: no backtick, one line."""
    return LINE_BREAKS.sub(" ", plain(str(text))).replace("`", "'").replace("\t", " ")


def step_name(task: str) -> str:
    return task.removesuffix("-op").replace("finetune", "fine-tune")


class StepConsole:
    """A file-like stand-in for sys.stdout while a pipeline runs (see kftune.local)."""

    def __init__(self, log_path: Path, terminal, verbose: bool = False, clock=time.monotonic):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path, self.terminal, self.verbose, self.clock = log_path, terminal, verbose, clock
        self._log = open(log_path, "a", encoding="utf-8")
        self._pending = ""
        self.started: dict[str, float] = {}
        self.steps: list[dict] = []  # {"step", "status", "seconds", "summary"} in finishing order
        self.task_lines: dict[str, list[str]] = {}
        self.current = ""
        self._progress_at = -1e9

    # file protocol -----------------------------------------------------------------------
    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(plain(line))
        return len(text)

    def flush(self) -> None:
        self._log.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        if self._pending:
            self._line(plain(self._pending))
        self._log.close()

    # ---------------------------------------------------------------------------------------
    def _say(self, line: str) -> None:
        print(line, file=self.terminal, flush=True)

    def _line(self, line: str) -> None:
        self._log.write(line + "\n")
        if self.verbose:
            self._say(line)
        if m := STARTED.search(line):
            self.current = m.group(1)
            self.started[self.current] = self.clock()
            self.task_lines[self.current] = []
            if not self.verbose:
                self._say(f"  {step_name(self.current)} ...")
            return
        if self.current:
            self.task_lines[self.current].append(line)
        if m := FINISHED.search(line):
            self._finish(m.group(1), "ok" if m.group(2) == "SUCCESS" else "failed")
        elif m := CACHED.search(line):
            self.steps.append({"step": step_name(m.group(1)), "status": "cached", "seconds": 0.0, "summary": ""})
            self._quiet_say(f"  {step_name(m.group(1))}: cached")
        elif m := SKIPPED.search(line):
            self.steps.append({"step": step_name(m.group(1)), "status": "skipped", "seconds": 0.0, "summary": ""})
            self._quiet_say(f"  {step_name(m.group(1))}: skipped ({line.split(':', 1)[-1].strip()[:120]})")
        elif (m := PROGRESS.search(line)) and self.clock() - self._progress_at >= PROGRESS_EVERY:
            self._progress_at = self.clock()
            self._quiet_say(f"    {m.group(1)}")

    def _quiet_say(self, line: str) -> None:
        if not self.verbose:
            self._say(line)

    def _finish(self, task: str, status: str) -> None:
        seconds = self.clock() - self.started.get(task, self.clock())
        summaries = [m.group(1) for m in map(STEP_LINE.search, self.task_lines.get(task, [])) if m]
        summary = summaries[-1] if summaries else ""
        self.steps.append({"step": step_name(task), "status": status, "seconds": seconds, "summary": summary})
        mark = "done" if status == "ok" else "FAILED"
        self._quiet_say(f"  {step_name(task)} {mark} in {seconds:.1f} s" + (f"  {summary[:160]}" if summary else ""))
        self.current = ""

    def root_cause(self) -> str:
        """The last error line a failed task printed (its exception), for the final message."""
        failed = [s["step"] for s in self.steps if s["status"] == "failed"]
        task = next((t for t in self.task_lines if step_name(t) == (failed[-1] if failed else "")), self.current)
        lines = [ln.strip() for ln in self.task_lines.get(task, []) if ln.strip()]
        errors = [i for i, ln in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception|Failed|Interrupt)\b.*:", ln)]
        if not errors:
            return (lines or [""])[-1][:1000]
        detail = []  # a multi-line message (ConfigError's "- key: problem" list) goes with its first line
        for ln in lines[errors[-1] + 1:errors[-1] + 11]:
            if not ln.startswith("- "):
                break
            detail.append("  " + ln)
        return "\n".join([lines[errors[-1]], *detail])[:1000]

    def failed_step(self) -> str:
        failed = [s["step"] for s in self.steps if s["status"] == "failed"]
        return failed[-1] if failed else step_name(self.current)
