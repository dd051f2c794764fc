"""Plots of ``robe_torchrec.bench.quality`` results (matplotlib, headless).

``python -m robe_torchrec.bench.quality_plots docs/img/quality_results.json`` redraws them.
"""

from __future__ import annotations

import json
import statistics
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_STYLE = {"hash": ("tab:gray", "s"), "qr": ("tab:brown", "D")}
_ROBE_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:olive", "tab:cyan", "tab:pink"]


def _robe_order(method: str) -> tuple:
    """robe-Z1 < robe-Z8 < robe-Z32, then the other ROBE families (robe_freq-Z1, robe2-Z1-e2)."""
    family, _, rest = method.partition("-Z")
    return (family != "robe", family, int(rest.split("-")[0]) if rest else 0, method)


def _styles(methods: List[str]) -> Dict[str, tuple]:
    styles = dict(_STYLE)
    robe = sorted((m for m in methods if m.startswith("robe")), key=_robe_order)
    for i, m in enumerate(robe):
        styles[m] = (_ROBE_COLORS[i % len(_ROBE_COLORS)], "o")
    return styles


def plot_all(results_json: str, prefix: str) -> List[str]:
    with open(results_json) as f:
        data = json.load(f)
    meta, runs, summary = data["meta"], data["runs"], data["summary"]
    methods = sorted({s["method"] for s in summary})
    styles = _styles(methods)
    teacher = meta.get("teacher_auc")  # None: real data, no known ceiling
    full = [s for s in summary if s["family"] == "full"]
    paths = []

    # AUC vs memory
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in methods:
        if m == "full":
            continue
        pts = sorted((s for s in summary if s["method"] == m), key=lambda s: s["memory_bytes"])
        color, marker = styles[m]
        ax.errorbar([s["memory_bytes"] for s in pts], [s["auc_mean"] for s in pts],
                    yerr=[s["auc_std"] for s in pts], color=color, marker=marker, capsize=3, label=m)
    if full:
        ax.errorbar([full[0]["memory_bytes"]], [full[0]["auc_mean"]], yerr=[full[0]["auc_std"]],
                    color="black", marker="*", markersize=12, capsize=3, linestyle="none", label="full tables")
        ax.axhline(full[0]["auc_mean"], color="black", lw=0.8, ls=":")
    if teacher is not None:
        ax.axhline(teacher, color="black", lw=1.0, ls="--", label=f"teacher (ceiling) {teacher:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("embedding memory (bytes, log scale)")
    ax.set_ylabel("test AUC")
    ax.set_title(f"AUC vs embedding memory ({meta['total_rows']:,} rows, D={meta['command_args']['dim']}, "
                 f"{runs[0]['samples']:,} samples)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = prefix + "_auc_vs_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    # AUC vs training samples at 1000x (or the largest ratio every baseline ran at)
    ratios = sorted({r["ratio"] for r in runs if r["family"] != "full"})
    target = 1000.0 if 1000.0 in ratios else (max(ratios) if ratios else None)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in methods:
        rs = [r for r in runs if r["method"] == m and (r["family"] == "full" or r["ratio"] == target)]
        if not rs or not rs[0]["curve"]:
            continue
        xs = [x for x, _ in rs[0]["curve"]]
        ys = [statistics.fmean(r["curve"][i][1] for r in rs if len(r["curve"]) > i) for i in range(len(xs))]
        color, marker = ("black", "*") if m == "full" else styles[m]
        ax.plot(xs, ys, color=color, marker=marker, label="full tables" if m == "full" else m)
    if teacher is not None:
        ax.axhline(teacher, color="black", lw=1.0, ls="--", label="teacher (ceiling)")
    ax.set_xscale("log")
    ax.set_xlabel("training samples (log scale)")
    ax.set_ylabel(f"AUC on {meta['command_args']['curve_eval_samples']:,} test samples")
    ax.set_title(f"Learning curves at {target:g}x compression (full tables for reference)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = prefix + "_auc_vs_samples.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


def lever_points(main_json: str, method: str, spec: str) -> Dict[float, Dict[int, Tuple[int, float]]]:
    """``{ratio: {seed: (memory bytes, AUC)}}`` of one plotted series. ``spec``: ``main`` (the runs of
    ``method`` in the main sweep) or ``FILE:VARIANT[,VARIANT...]`` (a quality_levers results file)."""
    if spec == "main":
        with open(main_json) as f:
            runs = [r for r in json.load(f)["runs"] if r["method"] == method]
    else:
        path, _, variants = spec.partition(":")
        with open(path) as f:
            runs = [r for r in json.load(f) if r["variant"] in variants.split(",")]
    out: Dict[float, Dict[int, Tuple[int, float]]] = {}
    for r in runs:
        out.setdefault(float(r["ratio"]), {})[int(r["seed"])] = (int(r["memory_bytes"]), float(r["auc"]))
    return out


def plot_levers(main_json: str, baseline: str, series: List[Tuple[str, str]], path: str) -> str:
    """Two panels over compression ratio: AUC of each series, and its AUC minus ``baseline``'s
    (the main sweep's method, paired by seed where both ran; a point per ratio)."""
    with open(main_json) as f:
        data = json.load(f)
    full = [s for s in data["summary"] if s["family"] == "full"]
    base = lever_points(main_json, baseline, "main")
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (label, spec) in enumerate([(baseline, "main"), *series]):
        pts = lever_points(main_json, baseline, "main") if spec == "main" else lever_points(main_json, "", spec)
        ratios = sorted(pts)
        color = "black" if i == 0 else _ROBE_COLORS[(i - 1) % len(_ROBE_COLORS)]
        ys = [statistics.fmean(a for _, a in pts[r].values()) for r in ratios]
        ax.plot(ratios, ys, color=color, marker="o", label=label)
        if i == 0:
            continue
        paired = [(r, [pts[r][s][1] - base[r][s][1] for s in pts[r] if s in base.get(r, {})]) for r in ratios]
        paired = [(r, d) for r, d in paired if d]
        dx.plot([r for r, _ in paired], [statistics.fmean(d) for _, d in paired], color=color, marker="o", label=label)
        for r, d in paired:
            dx.scatter([r] * len(d), d, color=color, s=10, alpha=0.5)
    if full:
        ax.axhline(full[0]["auc_mean"], color="black", lw=0.8, ls=":", label="full tables")
    dx.axhline(0.0, color="black", lw=0.8)
    for a in (ax, dx):
        a.set_xscale("log")
        a.set_xlabel("compression ratio (log scale; equal bytes across series)")
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("test AUC (mean over seeds)")
    dx.set_ylabel(f"AUC minus {baseline}, same seed (dots: seeds)")
    ax.legend(fontsize=8, loc="lower left")
    dx.legend(fontsize=8, loc="lower left")
    fig.suptitle("Planted benchmark: levers against plain ROBE at equal bytes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import argparse

    cli = argparse.ArgumentParser(
        description="Redraw the quality plots from a <prefix>_results.json file; or, with --levers OUT.png, "
        "plot LABEL=FILE:VARIANTS series of quality_levers results against --baseline of the main results.")
    cli.add_argument("results", nargs="?", default="docs/img/quality_results.json")
    cli.add_argument("--levers", metavar="OUT.png", help="draw the levers plot to this file")
    cli.add_argument("--baseline", default="robe-Z1", help="the main sweep's method the levers are paired with")
    cli.add_argument("--series", nargs="*", default=[], metavar="LABEL=FILE:VARIANTS")
    args = cli.parse_args()
    src = args.results
    if not src.endswith("_results.json"):
        cli.error(f"expected a <prefix>_results.json file, got {src!r}")
    if args.levers:
        series = []
        for item in args.series:
            label, sep, spec = item.partition("=")
            if not sep or ":" not in spec:
                cli.error(f"--series takes LABEL=FILE:VARIANT[,VARIANT...], got {item!r}")
            series.append((label, spec))
        print(plot_levers(src, args.baseline, series, args.levers))
    else:
        for p in plot_all(src, src[: -len("_results.json")]):
            print(p)
