"""Shared weights vs one LoRA adapter per role: a table and a per-role reward plot of train runs.

Reads run folders written by ``lightning-lab train --env wordplay --out DIR`` (with and without
``--adapters namer,shouter``): greedy dev metrics before / after from ``summary.json``, each
role's mean training reward per iteration from ``trajectories.jsonl`` (the role's transition
rewards; the iteration is the ``s<k>/`` prefix of a trajectory's ``group_id``) and the trainer's
``reward/<adapter>`` metrics from ``metrics.jsonl``. A run's label is its folder name unless given
as ``LABEL=DIR``. Used for the README's "One LoRA adapter per role":

    python benchmarks/role_adapters.py shared=/work/runs/cmp-shared roles=/work/runs/cmp-roles \\
        --out docs/role_adapters.png
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402

from plot_runs import read_metrics, run_args, save_figure  # noqa: E402

DEV_METRICS = ("one_word", "shout_ok")


def role_rewards(folder: Path, field: str = "reward") -> dict[str, list[float]]:
    """Role -> the mean of a transition field (its reward, or the advantage credit gave it) at
    each iteration (index 0 = iteration 1)."""
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(folder / "trajectories.jsonl") as f:
        for n, line in enumerate(f, 1):
            traj = json.loads(line)
            prefix = traj["group_id"].partition("/")[0]
            if not prefix.startswith("s") or not prefix[1:].isdigit():
                raise ValueError(f"{folder}/trajectories.jsonl line {n}: group_id "
                                 f"{traj['group_id']!r} has no s<iteration>/ prefix")
            for tr in traj["transitions"]:
                sums[tr["role"]][int(prefix[1:])].append(tr[field])
    return {role: [sum(v) / len(v) for _, v in sorted(by_it.items())]
            for role, by_it in sorted(sums.items())}


def summary_row(label: str, folder: Path) -> dict[str, object]:
    """One table row: dev metrics before -> after, mean per-role training reward of the first and
    last two iterations, each role's mean advantage over the run, the last ``reward/<adapter>`` and
    ``kl/<adapter>`` values."""
    summary = json.loads((folder / "summary.json").read_text())
    row: dict[str, object] = {"run": label}
    for key in DEV_METRICS:
        row[f"dev {key}"] = f"{summary['before'][key]:.2f} -> {summary['after'][key]:.2f}"
    for role, ys in role_rewards(folder).items():
        first, last = sum(ys[:2]) / len(ys[:2]), sum(ys[-2:]) / len(ys[-2:])
        row[f"train {role}"] = f"{first:.2f} -> {last:.2f}"
    for role, ys in role_rewards(folder, "advantage").items():
        row[f"mean advantage {role}"] = f"{sum(ys) / len(ys):+.2f}"
    final = read_metrics(folder)[-1]
    adapters = sorted((k, v) for k, v in final.items() if k.startswith(("reward/", "kl/")))
    row["last reward/kl per adapter"] = " ".join(f"{k}={v:.3f}" for k, v in adapters) or "-"
    row["minutes"] = f"{summary['train_minutes']:.1f}"
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    """A markdown table (the README pastes it as is)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")


def plot(runs: dict[str, Path], out: Path) -> None:
    """One panel per role, one line per run: the role's training reward per iteration."""
    curves = {label: role_rewards(folder) for label, folder in runs.items()}
    roles = sorted({role for c in curves.values() for role in c})
    fig, axes = plt.subplots(1, len(roles), figsize=(5 * len(roles), 3.4), squeeze=False)
    for ax, role in zip(axes[0], roles):
        for label, by_role in curves.items():
            ys = by_role.get(role, [])
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=label,
                    linestyle="-" if "shared" not in label else "--")
        ax.set_title(f"{role}: training reward (mean per transition)")
        ax.set_xlabel("iteration")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, out)


def main() -> None:
    runs, out = run_args(__doc__.splitlines()[0])
    print_table([summary_row(label, folder) for label, folder in runs.items()])
    for label, folder in runs.items():
        for role, ys in role_rewards(folder).items():
            print(f"{label:>12} {role:>8}: " + " ".join(f"{y:.2f}" for y in ys))
    plot(runs, out)


if __name__ == "__main__":
    main()
