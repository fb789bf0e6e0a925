#!/usr/bin/env python3
"""Draw the PNG plots of a `busbench compare` report from its JSON twin.

    plot.py RESULTS.json STEM   ->  STEM-throughput.png, STEM-latency.png

busbench runs this itself after a comparison (with the matplotlib that
bench/peers/fetch.sh installs into its virtualenv). Only medians from the
report's "summary" are drawn; every number is in the markdown too.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def short(durability):
    return durability.split(":")[0]


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py RESULTS.json STEM")
    with open(sys.argv[1]) as f:
        report = json.load(f)
    stem = sys.argv[2]
    summary = report["summary"]
    sizes = report["method"]["sizes"]
    systems = []
    for row in summary:
        if row["system"] not in systems:
            systems.append(row["system"])
    title = f'{report["date_utc"]}, {report["machine"]["nproc"]} CPUs shared by servers and load generator'

    # Throughput by batch size: one line per system, log scale.
    fig, ax = plt.subplots(figsize=(10, 6))
    for s in systems:
        xs, ys = [], []
        for i, size in enumerate(sizes):
            row = next((r for r in summary if r["system"] == s and r["batch"] == size), None)
            if row and row["max"]:
                xs.append(i)
                ys.append(row["max"]["mb_per_s"])
        if xs:
            style = "-" if s.startswith("arrowbus") else "--"
            ax.plot(xs, ys, style, marker="o", label=s, linewidth=2.5 if s.startswith("arrowbus") else 1.5)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels(sizes)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("acked MB/s (Arrow IPC bytes), median")
    ax.set_title(f"Maximum publish throughput (closed loop)\n{title}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}-throughput.png", dpi=110)
    plt.close(fig)

    # Latency percentiles by offered rate: one panel per size.
    loads = report["method"]["load_pct"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 5.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for s in systems:
            row = next((r for r in summary if r["system"] == s and r["batch"] == size), None)
            if not row or not row["latency"]:
                continue
            lat = sorted(row["latency"], key=lambda l: l["load_pct"])
            xs = [l["load_pct"] for l in lat]
            (line,) = ax.plot(xs, [l["p99_us"] / 1000 for l in lat], marker="o", label=f"{s} p99")
            ax.plot(xs, [l["p50_us"] / 1000 for l in lat], ":", color=line.get_color(), marker=".")
            ax.plot(xs, [l["p999_us"] / 1000 for l in lat], "--", color=line.get_color(), alpha=0.5)
        ax.set_yscale("log")
        ax.set_xticks(loads)
        ax.set_xlabel("offered rate, % of the system's maximum")
        ax.set_ylabel("publish→deliver ms (p50 dotted, p99 solid, p99.9 dashed)")
        ax.set_title(size)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Publish→deliver latency from intended send time\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(f"{stem}-latency.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
