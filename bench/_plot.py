"""The PNG in BENCHMARKS.md: throughput bars and latency bars from one run's results."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: write files only

import matplotlib.pyplot as plt


def _label_bars(axis: Any, bars: Any, unit: str) -> None:
    for bar in bars:
        height = bar.get_height()
        axis.annotate(
            f"{height:,.0f}{unit}" if height >= 10 else f"{height:.1f}{unit}",
            (bar.get_x() + bar.get_width() / 2, height),
            ha="center",
            va="bottom",
            fontsize=8,
        )


def plot(results: dict[str, Any], output: Path) -> None:
    """Write throughput (left) and latency (right) bar charts to output."""
    http, backlog = results["http"], results["backlog"]
    per_message = backlog["drain_batch_publish"]["scores_per_message"]
    drain_single, drain_batch, drain_direct = (
        backlog[k]["steady_per_s"] for k in ("drain", "drain_batch", "drain_batch_direct")
    )
    throughput = {
        "bare\nreq/s": http["bare"]["requests_per_s"],
        "naive\nreq/s": http["naive"]["requests_per_s"],
        "score-ingest\nsingle req/s": http["single"]["requests_per_s"],
        "score-ingest\nbatch scores/s": http["batch"]["scores_per_s"],
        "drain, single-\nscore messages\nscores/s": drain_single,
        f"drain, api's batch\nmessages of {per_message}\nscores/s": drain_batch,
        "drain, direct\nbatch messages\n(validated)\nscores/s": drain_direct,
    }
    visibility = results["visibility"]
    latency = {
        "bare": (http["bare"]["latency_p50_ms"], http["bare"]["latency_p99_ms"]),
        "naive": (http["naive"]["latency_p50_ms"], http["naive"]["latency_p99_ms"]),
        "single": (http["single"]["latency_p50_ms"], http["single"]["latency_p99_ms"]),
        "batch of 500": (http["batch"]["latency_p50_ms"], http["batch"]["latency_p99_ms"]),
        "single at\nhalf load": (visibility["latency_p50_ms"], visibility["latency_p99_ms"]),
        "200 → row\nreadable": (visibility["visibility_p50_ms"], visibility["visibility_p99_ms"]),
    }
    figure, (left, right) = plt.subplots(1, 2, figsize=(17, 5.5))
    colors = [
        "#9e9e9e", "#e07b39", "#3b75af", "#8fb3d9", "#2e8b57", "#7b4ea3", "#b0507e", "#d9a3bf"
    ]  # fmt: skip
    bars = left.bar(list(throughput), list(throughput.values()), color=colors)
    _label_bars(left, bars, "")
    naive, bare = http["naive"]["requests_per_s"], http["bare"]["requests_per_s"]
    # The targets, as ticks across the bars they apply to; each drain must keep up
    # with the accept rate of the same form (single POSTs, batch POSTs).
    targets = {
        2: max(2 * naive, 0.6 * bare),
        4: 15 * naive,
        5: http["single"]["requests_per_s"],
        6: http["batch"]["scores_per_s"],
    }
    for index, level in targets.items():
        bar = bars[index]
        left.hlines(
            level,
            bar.get_x() - 0.08,
            bar.get_x() + bar.get_width() + 0.08,
            colors="red",
            linestyles="--",
            linewidth=1.2,
            label="target" if index == 2 else None,
        )
    left.legend(fontsize=8, loc="upper left")
    left.set_yscale("log")
    left.set_ylabel("per second (log scale)")
    left.set_title(f"Throughput, {http['single']['connections']} connections")
    left.tick_params(axis="x", labelsize=7.5)

    positions = range(len(latency))
    width = 0.38
    p50 = [values[0] for values in latency.values()]
    p99 = [values[1] for values in latency.values()]
    _label_bars(right, right.bar([p - width / 2 for p in positions], p50, width, label="p50"), "")
    _label_bars(right, right.bar([p + width / 2 for p in positions], p99, width, label="p99"), "")
    right.axhline(500, color="red", linestyle="--", linewidth=1, label="visibility target 500 ms")
    right.set_xticks(list(positions), list(latency), fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("milliseconds (log scale)")
    right.set_title("Latency: full load with wrk, half load paced")
    right.legend(fontsize=8)

    meta = results["meta"]
    commit = meta["code"].get("commit", "")[:8] or meta["code"]["source"]
    figure.suptitle(
        f"score-ingest {commit}, {meta['machine']['cpus']} cores, {meta['started_at']} "
        f"(load average at start {meta['load_at_start'][0]:.2f})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
