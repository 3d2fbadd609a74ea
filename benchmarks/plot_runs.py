"""Training curves of several runs side by side: reward and KL per iteration, one line per run.

Reads each run folder's ``metrics.jsonl`` (what ``lightning-lab train --out DIR`` writes) and
saves one PNG with a reward panel and a KL panel; a run's label is its folder name unless given
as ``LABEL=DIR``. Used for the README's sync-vs-async comparison:

    python benchmarks/plot_runs.py sync=runs/vllm-sync "K=1"=runs/vllm-k1 --out docs/sync_vs_async.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("reward_mean", "training reward (mean)"), ("kl", "KL to the reference"))


def read_metrics(folder: Path) -> list[dict[str, float]]:
    """The iterations of a run in order; an iteration is ``iteration`` (``step`` in older logs)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return sorted(rows, key=lambda r: r.get("iteration", r.get("step", 0)))


def plot(runs: dict[str, Path], out: Path) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.4))
    for label, folder in runs.items():
        rows = read_metrics(folder)
        x = [r.get("iteration", r.get("step")) for r in rows]
        for ax, (key, _) in zip(axes, PANELS):
            ax.plot(x, [r.get(key, float("nan")) for r in rows], marker="o", label=label)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    save_figure(fig, out)


def save_figure(fig: Any, out: Path) -> None:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def run_args(description: str) -> tuple[dict[str, Path], Path]:
    """The command line of a script over run folders: ``DIR`` or ``LABEL=DIR`` each, ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runs", nargs="+", help="run folders, each DIR or LABEL=DIR")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    runs = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        runs[label or Path(folder).name] = Path(folder)
    return runs, args.out


def main() -> None:
    plot(*run_args(__doc__.splitlines()[0]))


if __name__ == "__main__":
    main()
