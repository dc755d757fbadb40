"""Run the benchmarks and print their tables.

python -m bench                      # all of them (about 15 minutes on 2 cores)
python -m bench detection footprint  # some of them
python -m bench --quick              # each in a short smoke mode (numbers not meaningful)
python -m bench --json out.json      # also write the results as JSON (default bench/results.json)
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench.benchmarks import BENCHMARKS, Mode, Rows, machine, projection
from bench.harness import ROOT


def table(title: str, rows: Rows) -> str:
    if not rows:
        return f"\n## {title}\n\n(no rows)\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return f"\n## {title}\n\n" + "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "timeout" if math.isinf(value) else "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("names", nargs="*", choices=[[], *BENCHMARKS], metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="short smoke mode: proves they run")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results.json")
    args = parser.parse_args(argv)
    mode = Mode(quick=args.quick)
    # Start-up is measured as an installed wheel has it: pip compiles the bytecode on install,
    # while a checkout run with PYTHONDONTWRITEBYTECODE=1 would compile announcer on every start.
    compileall.compile_dir(str(ROOT / "announcer"), quiet=1)
    names = args.names or list(BENCHMARKS)
    header = (f"# announcer vs the sidekick loop: {datetime.date.today()}, {machine()}, "
              f"Python {platform.python_version()}{' (quick mode)' if mode.quick else ''}")  # fmt: skip
    print(header, flush=True)
    results: dict[str, Any] = {"date": str(datetime.date.today()), "machine": machine(), "quick": mode.quick}
    for name in names:
        started = time.monotonic()
        rows = BENCHMARKS[name](mode)
        results[name] = rows
        print(table(f"{name} ({time.monotonic() - started:.0f} s)", rows), flush=True)
        if name == "scale":
            results["projection"] = projection(rows)
            print(table("projection: 10,000 instances", results["projection"]), flush=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\n(results written to {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
