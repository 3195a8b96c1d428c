"""PNG plots of a run: per phase, the speedup over the dense reference against T, one panel per configuration."""

from __future__ import annotations

import os
from collections import defaultdict

from .suite import TRAINING

TITLES = {"fwd": "forward", "bwd": "backward alone", "fwdbwd": "forward + backward",
          "layer": "attention layer, forward + backward", "decode": "decode, one token per sequence",
          "generate": "model generate(), per new token"}


def plot_all(results: dict, out: str) -> list[str]:
    """Write speedup_<phase>.png for every phase with timed rows; return the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import ScalarFormatter

    written = []
    for phase, title in TITLES.items():
        reference = results["reference_baseline"]["train" if phase in TRAINING else phase]
        rows = [r for r in results["rows"] if r["phase"] == phase and r["speedup"] and r["impl"] != reference]
        if not rows:
            continue
        configs = list(dict.fromkeys(r["config"] for r in rows))
        fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.6), squeeze=False, sharey=True)
        for ax, name in zip(axes[0], configs):
            lines = defaultdict(list)
            for r in rows:
                if r["config"] == name:
                    label = r["label"] + ("" if r["B"] == 1 else f", B={r['B']}")
                    lines[label].append((r["T"], r["speedup"]))
            for label, points in lines.items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label=f"{reference} (= 1)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.set_title(name)
            ax.set_xlabel("context T" if phase in ("decode", "generate") else "T")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel(f"speedup over {reference}")
        env = results["runs"][0]["environment"]
        fig.suptitle(f"{title}: {env.get('gpu') or env.get('cpu')}, {results['dtype']}", fontsize=10)
        fig.tight_layout()
        name = f"speedup_{phase}.png"
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(name)
    return written
