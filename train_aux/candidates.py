"""Every auxiliary checkpoint judged on the dev split, on one plot: ARC-Easy acc_norm change against checks passed.

    python -m train_aux.candidates      # train_aux/results/dev_candidates.csv -> train_aux/candidates.png

The figures are those of train_aux/EXPERIMENTS.md (its `section` column names where), each measured by the rule the
candidates were judged by: ARC-Easy items 1000-1999 with 2 training users per item (`eval general --skip 1000
--users-per-item 2`); checks on the 80 fresh held-out-phrasing users of the K = 4 rule (nine preference types), or,
where the name says "broad dev users", on the 80 of `train_aux/data-broad/dev_users.jsonl` (22 kinds). Until issue
24 a candidate inside the rule's corner (a change of at least -0.25 points and at least 25% of checks passed)
shipped; the broad checkpoint, 0.10 point outside it, ships on the issue's bounds on the reported sets
(EXPERIMENTS.md, "Guidance where the thoughts move the token").
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
KINDS = ("shipped", "shipped earlier", "candidate", "measurement")
#: The rule every candidate was judged by, written before each was trained (EXPERIMENTS.md, "Fewer thoughts").
MIN_ARC_EASY_CHANGE, MIN_CHECKS_PASSED = -0.25, 25.0


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str
    arc_easy_change: float
    arc_easy_change_se: float
    checks_passed: float
    checks_passed_se: float
    section: str


def load(path: Path) -> list[Candidate]:
    out = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), 2):
            try:
                numbers = {k: float(row[k]) for k in ("arc_easy_change", "arc_easy_change_se", "checks_passed",
                                                      "checks_passed_se")}
                if not all(math.isfinite(v) for v in numbers.values()) or row["kind"] not in KINDS:
                    raise ValueError
                out.append(Candidate(row["name"], row["kind"], section=row["section"], **numbers))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}:{line}: needs a name, a kind ({', '.join(KINDS)}), four numbers and a section: "
                                 f"{row}") from None
    return out


def plot(candidates: list[Candidate], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"shipped": "*", "shipped earlier": "o", "candidate": "s", "measurement": "D"}
    fig, ax = plt.subplots(figsize=(10, 5.5))
    top = max([45.0] + [c.checks_passed + c.checks_passed_se + 2 for c in candidates])
    ax.fill_between([MIN_ARC_EASY_CHANGE, 1.0], MIN_CHECKS_PASSED, top, color="#2ca02c", alpha=0.12,
                    label="the rule's corner: ships")
    # too close together to label in place: one colour each, named in the legend
    tab20 = plt.get_cmap("tab20").colors
    colors = tab20[::2] + tab20[1::2]  # 20 distinct: the ten strong colours, then their light shades
    for i, c in enumerate(candidates):
        ax.errorbar(c.arc_easy_change, c.checks_passed, xerr=c.arc_easy_change_se, yerr=c.checks_passed_se,
                    fmt=markers[c.kind], markersize=12 if c.kind == "shipped" else 7, color=colors[i % len(colors)],
                    capsize=3, elinewidth=1, label=f"{c.name} ({c.kind})", zorder=3 if c.kind == "shipped" else 2)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(xlabel="dev ARC-Easy acc_norm change vs plain (points, paired; ± 1 SE)",
           ylabel="checks passed, 80 fresh users (%)")
    # over the whole figure: the legend beside the axes leaves them narrower than the title
    fig.suptitle("Every checkpoint judged on the dev split: personalization against general ability")
    ax.set(xlim=(-5.6, 1.0), ylim=(5, top))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(HERE / "results" / "dev_candidates.csv"))
    ap.add_argument("--out", default=str(HERE / "candidates.png"))
    args = ap.parse_args(argv)
    try:
        candidates = load(Path(args.csv))
    except (OSError, ValueError) as e:
        ap.error(str(e))
    plot(candidates, Path(args.out))
    print(f"{len(candidates)} checkpoints -> {args.out}")


if __name__ == "__main__":
    main()
