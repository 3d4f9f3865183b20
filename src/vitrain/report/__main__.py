"""`python -m vitrain.report PATH ... [--baseline KEY=VALUE] [--csv FILE] [--plot FILE.png]`:
compare runs from their run_report.json files (vitrain.report.compare says how)."""

import sys
from collections.abc import Sequence

from vitrain.report.compare import ReportError, compare, load_reports, plot, to_markdown, write_csv


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vitrain.report",
        description="Compare runs from their run_report.json files (a Markdown table on stdout).",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run/multirun dir, parent or file")
    parser.add_argument(
        "--baseline", metavar="KEY=VALUE", help="e.g. container=pip (default: row 1)"
    )
    parser.add_argument("--csv", metavar="FILE", help="also write the rows as CSV")
    parser.add_argument("--plot", metavar="FILE.png", help="also write a bar chart")
    args = parser.parse_args(argv)
    try:
        comparison = compare(load_reports(args.paths), args.baseline)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(comparison))
    if args.csv:
        write_csv(comparison, args.csv)
    if args.plot:
        plot(comparison, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
