"""The monitoring report: Markdown (every value escaped) and one PNG of the checks over time."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from kftune.console import markdown_cell as md


def render(check: dict) -> str:
    lines = [f"# Monitoring check: {md(check['model'])} v{md(check['version'] or '-')}", "",
             f"At {md(check['now'])}: {check['new_requests']} new predictions since the watermark "
             f"{md(check['watermark_before'] or 'start')}; {md(check['drift_why'])}.", ""]
    if check["drift"]:
        lines += ["| test | score | p-value | drift |", "|---|---|---|---|"]
        for m, c in check["drift"].items():
            p = "" if c["p_value"] is None else f"{c['p_value']:.4g}"
            lines.append(f"| {md(m)} | {c['score']:.4g} | {p} | {'yes' if c['verdict'] else 'no'} |")
        lines.append("")
    lines += ["| alert rule | state | value | requests | why |", "|---|---|---|---|---|"]
    for v in check["rules"]:
        value = "" if v["value"] is None else f"{v['value']:.4g}"
        lines.append(f"| {md(v['name'])} | {v['status']} | {value} | {v['requests']} | {md(v['why'])} |")
    if check["events"]:
        lines += ["", "Alerts this check:", ""]
        lines += [f"- **{md(e['alert'])}** {e['status']}: {md(e['why'])}" for e in check["events"]]
    live = check["live"]
    if live.get("n"):
        lines += ["", f"Live quality on {live['n']} random-sample labels: accuracy {live['accuracy']:.3f} "
                      f"[{live['accuracy_low']:.3f}, {live['accuracy_high']:.3f}], macro-F1 {live['macro_f1']:.3f} "
                      f"[{live['macro_f1_low']:.3f}, {live['macro_f1_high']:.3f}] ({live['level']:.0%} intervals); "
                      f"test accuracy {'-' if check['test_accuracy'] is None else format(check['test_accuracy'], '.3f')}."]
    lines += ["", "![monitoring](monitor.png)"]
    return "\n".join(lines) + "\n"


def alert_spans(history: list[dict]) -> dict[str, list[tuple]]:
    """alert name -> [(start, end)] of the stretches it was failing (end None: still failing)."""
    spans: dict[str, list] = {}
    for h in history:
        t = pd.Timestamp(h["now"])
        for name, status in h["alerts"].items():
            runs = spans.setdefault(name, [])
            if status == "failing" and (not runs or runs[-1][1] is not None):
                runs.append([t, None])
            elif status != "failing" and runs and runs[-1][1] is None:
                runs[-1][1] = t
    return {k: [tuple(r) for r in v] for k, v in spans.items()}


def plot(history: list[dict], path: str | Path) -> None:
    """A lane per alert rule showing when it was firing, then per check: label shares, mean confidence (and
    live accuracy when known), drift p-values, predictions and the version served."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    df = pd.DataFrame(history)
    t = pd.to_datetime(df["now"])
    spans = alert_spans(history)
    fig, (lanes, *axes) = plt.subplots(5, 1, figsize=(11, 11), sharex=True,
                                       gridspec_kw={"height_ratios": [0.25 * max(len(spans), 1) + 0.5, 3, 3, 3, 3]})
    busy = (df["requests"] > 0).to_numpy()  # a check with no new traffic has no shares or confidence to draw
    shares = pd.DataFrame(list(df["shares"])).fillna(0)[busy]
    for lbl in shares.columns:
        axes[0].plot(t[busy], shares[lbl], marker=".", label=str(lbl))
    axes[0].set(ylabel="predicted share", title="traffic: predicted label shares per check")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[1].plot(t[busy], df["confidence"][busy], marker=".", color="tab:purple", label="mean confidence")
    if "live_accuracy" in df and df["live_accuracy"].notna().any():
        acc = df["live_accuracy"].astype(float)
        # clipped at 0: state files written before wilson() held its bounds around p may have one a hair inside
        axes[1].errorbar(t, acc, yerr=[(acc - df["live_accuracy_low"].astype(float)).clip(lower=0),
                                       (df["live_accuracy_high"].astype(float) - acc).clip(lower=0)],
                         fmt="o", capsize=4, color="tab:green", label="live accuracy (random sample, interval)")
    axes[1].set(ylabel="confidence / accuracy")
    axes[1].legend(loc="lower left", fontsize=8)
    for key, style in (("embedding_p", "o-"), ("confidence_p", "s-")):
        if key in df:
            axes[2].plot(t, df[key], style, label=key.replace("_p", " p-value"))
    axes[2].set(yscale="log", ylabel="p-value", title="drift tests (checks where they ran)")
    axes[2].axhline(0.05, color="grey", lw=0.8, ls="--")
    axes[2].legend(loc="lower left", fontsize=8)
    axes[3].bar(t, df["requests"], width=0.6 * (t.diff().median() if len(t) > 1 else pd.Timedelta(hours=1)),
                color="tab:grey")
    axes[3].set(ylabel="predictions", title="predictions per check (bar) and the version served")
    ax = axes[3].twinx()
    ax.step(t, pd.to_numeric(df["version"], errors="coerce"), where="post", color="tab:red")
    ax.set_ylabel("version", color="tab:red")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    end = t.max()
    for row, (name, runs) in enumerate(spans.items()):  # one lane per alert: when it was firing
        for start, stop in runs:
            lanes.barh(row, (stop or end) - start, left=start, height=0.6, color="tab:red", alpha=0.7)
    lanes.set(yticks=range(len(spans)), yticklabels=list(spans), ylim=(-0.6, max(len(spans), 1) - 0.4),
              title="alerts firing")
    lanes.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
