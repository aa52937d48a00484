"""Print the table, the ratios, MFU and the goals of throughput JSON files (bench/results/*.json):

    python bench/summarize.py bench/results/cpu-small-qwen2-vl.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput.report import markdown_table  # noqa: E402


def summarize(path: Path) -> str:
    report = json.loads(path.read_text(encoding="utf-8"))
    lines = [f"## {path.name}: {report.get('name')}", markdown_table(report), ""]
    for arm, fig in report["arms"].items():
        if "error" not in fig:
            mfu = fig.get("mfu")
            lines.append(f"{arm}: MFU {'n/a (no bf16 peak known for this device)' if mfu is None else f'{mfu:.1%}'}, "
                         f"{(fig.get('model_flops_per_second') or 0) / 1e12:.2f} model TFLOP/s")
    for goal, g in (report.get("goals") or {}).items():
        lines.append(f"goal {goal}: value {g.get('value')}, met {g.get('met')}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print("\n\n".join(summarize(Path(p)) for p in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
