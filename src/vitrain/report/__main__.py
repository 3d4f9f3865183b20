"""`python -m vitrain.report PATH ... [--baseline KEY=VALUE] [--csv FILE] [--plot FILE.png]
[--scaling]`: compare runs from their run_report.json files (vitrain.report.compare says how;
--scaling: strong and weak scaling efficiency instead, vitrain.report.scaling)."""

import sys
from collections.abc import Sequence

from vitrain.report.compare import ReportError, compare, load_reports, plot, to_markdown, write_csv
from vitrain.report.scaling import scaling, scaling_markdown, write_scaling_csv


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
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead: each multi-device run against the 1-device run of the same settings "
        "(strong and weak scaling efficiency); --csv writes those rows",
    )
    args = parser.parse_args(argv)
    try:
        reports = load_reports(args.paths)
        table = scaling(reports) if args.scaling else compare(reports, args.baseline)
        plotted = compare(reports) if args.scaling and args.plot else table
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(scaling_markdown(table) if args.scaling else to_markdown(table))
    if args.csv:
        (write_scaling_csv if args.scaling else write_csv)(table, args.csv)
    if args.plot:
        plot(plotted, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
