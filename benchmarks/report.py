"""Table and bar chart from a pytest-benchmark JSON file.

    pytest benchmarks --benchmark-only --benchmark-json bench.json
    python benchmarks/report.py bench.json [--png bench.png]

Prints one row per benchmark with the side-by-side numbers each stored in ``extra_info`` and,
with --png (needs matplotlib), draws the speed-up / ratio of every row.
"""

from __future__ import annotations

import argparse
import json
import sys

RATIO_KEYS = ("speedup", "gpu_speedup", "time_ratio", "fraction_of_copy", "step_ratio", "saved_ratio", "peak_ratio")


def rows(report: dict) -> list[tuple[str, dict]]:
    return [(b["name"].removeprefix("test_"), b.get("extra_info", {})) for b in report["benchmarks"]]


def format_table(report: dict) -> str:
    machine = report.get("machine_info", {})
    lines = [f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, python {machine.get('python_version', '?')}"]
    for name, info in rows(report):
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        lines.append(f"{name:60s} {shown}")
    return "\n".join(lines)


def draw(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(name, key, info[key]) for name, info in rows(report) for key in RATIO_KEYS if key in info]
    if not bars:
        print("no ratios to draw", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(bars) + 1))
    ax.barh([f"{name} ({key})" for name, key, _ in bars], [value for *_, value in bars])
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio\nspeedup (wall, GPU kernels): original / ours; time, step, peak, saved: ours / baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("--png", help="also draw the ratios as a bar chart here")
    args = parser.parse_args(argv)
    with open(args.json, encoding="utf-8") as fh:
        report = json.load(fh)
    print(format_table(report))
    if args.png:
        draw(report, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
