"""Markdown tables, one per benchmark group, from a pytest-benchmark JSON file of
bench/test_optim_step.py:

    python bench/summarize.py out.json

Each row is one variant: its median step time, its achieved bandwidth (bytes moved per step /
median) and that bandwidth relative to the group's `torch-fused` and `add_` rows. A ratio is
"this variant's speed / the other's speed", so in the fusedtrain row > 1 means fusedtrain is
faster. Against add_ (an fp32 add_ that moves the same number of bytes) it compares bandwidths,
i.e. how close the variant gets to the memory bandwidth a plain streaming kernel reaches in the
same run.
conftest.py prints the same tables at the end of a benchmark run.
"""

from __future__ import annotations

import json
import sys

FUSED, ADD = "torch-fused", "add_"


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-6:.3g} us"


def markdown(rows: list[dict]) -> str:
    """rows: dicts with group, variant, median (s) and bytes (per step), in run order."""
    groups: dict[str, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], {})[row["variant"]] = row
    lines = []
    for group, variants in groups.items():
        gbps = {name: row["bytes"] / row["median"] / 1e9 for name, row in variants.items()}
        lines += [f"### {group}", "",
                  f"| variant | median | GB/s | vs {FUSED} | vs {ADD} |", "|---|---:|---:|---:|---:|"]
        for name, row in variants.items():
            ratios = [f"{gbps[name] / gbps[ref]:.2f}" if ref in gbps else "-" for ref in (FUSED, ADD)]
            lines.append(f"| {name} | {format_time(row['median'])} | {gbps[name]:.3g} | " + " | ".join(ratios) + " |")
        lines.append("")
    return "\n".join(lines)


def rows_from_json(path: str) -> list[dict]:
    with open(path) as f:
        benchmarks = json.load(f)["benchmarks"]
    return [{"group": b["group"], "variant": b["params"]["variant"], "median": b["stats"]["median"],
             "bytes": b["extra_info"]["bytes"]} for b in benchmarks]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(markdown(rows_from_json(sys.argv[1])))
