"""Plot `bigtrain bench train --json` results: tokens/s (bigtrain and HF Trainer) and MFU per configuration.

usage: python bench/plot_train.py OUT.png RESULT.json [RESULT.json ...]
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, files: list[str]) -> None:
    rows = [json.load(open(f)) for f in files]
    labels = [f"{r['preset']}\n{r['precision']} ZeRO-{r['zero_stage']}" for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 4))
    ax1.bar([i - 0.2 for i in x], [r["tokens_per_s"] for r in rows], width=0.4, label="bigtrain")
    if all("hf_tokens_per_s" in r for r in rows):
        ax1.bar([i + 0.2 for i in x], [r["hf_tokens_per_s"] for r in rows], width=0.4, label="HF Trainer")
        for i, r in zip(x, rows):
            ax1.annotate(f"{r['step_time_ratio']:.2f}x", (i, max(r["tokens_per_s"], r["hf_tokens_per_s"])), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(list(x), labels, fontsize=8)
    ax1.set_ylabel("tokens/s")
    ax1.set_title("throughput (label: step-time ratio bigtrain/HF)", fontsize=9)
    ax1.legend(fontsize=8)
    ax2.bar(list(x), [100 * r["mfu"] for r in rows])
    ax2.set_xticks(list(x), labels, fontsize=8)
    ax2.set_ylabel("MFU (%)")
    ax2.set_title(f"MFU vs {rows[0]['peak_source']}"[:70], fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
