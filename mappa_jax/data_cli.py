"""`mappa-data DATASET`: download a published dataset's files and verify them by size and sha256.

    mappa-data paper-math                 # the paper's math problems into data/paper/
    mappa-data paper-math --dir /data/m   # elsewhere (point the configs' data paths there)
    mappa-data paper-math --check         # only verify what is there; exit 1 if anything is off

Files already present and verified are kept; an interrupted download resumes when the command
runs again; nothing unverified is ever left under a file's own name (mappa_jax/data/download.py).
--manifest FILE replaces the built-in list of files (a JSON list of {name, url, size, sha256}),
e.g. to fetch from a mirror.
"""
from __future__ import annotations

import argparse
import sys

from mappa_jax.data.download import DATASETS, check_files, fetch_files, read_manifest
from mappa_jax.data.task import DataError


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {d.name}: {d.description} -> {d.default_dir}/" for d in DATASETS.values())
    parser = argparse.ArgumentParser(
        prog="mappa-data", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download a published dataset's files and verify them (size and sha256).",
        epilog="datasets:\n" + listing)
    parser.add_argument("dataset", choices=sorted(DATASETS), help="which dataset")
    parser.add_argument("--dir", help="where the files go (default: the dataset's own, e.g. "
                                      "data/paper under the current directory)")
    parser.add_argument("--manifest", help="JSON list of {name, url, size, sha256} to use "
                                           "instead of the built-in one (a mirror)")
    parser.add_argument("--check", action="store_true",
                        help="download nothing; verify the files present, exit 1 unless all are")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries per file after a dropped connection (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds without data before a connection counts as dropped")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    dataset = DATASETS[args.dataset]
    directory = args.dir or dataset.default_dir
    try:
        files = read_manifest(args.manifest) if args.manifest else dataset.files
        if args.check:
            states = check_files(files, directory)
            for name, state in states.items():
                print(f"{directory}/{name}: {state}")
            bad = [name for name, state in states.items() if state != "ok"]
            if bad:
                print(f"error: {len(bad)} of {len(states)} file(s) missing or not matching their "
                      f"sha256; run `mappa-data {dataset.name}"
                      f"{'' if args.dir is None else ' --dir ' + args.dir}` to fetch them",
                      file=sys.stderr)
                return 1
            return 0
        results = fetch_files(files, directory, retries=args.retries, timeout_s=args.timeout,
                              progress=not args.quiet, log=print)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    fetched = sum(r.status != "present" for r in results)
    print(f"{dataset.name}: {len(results)} file(s) verified in {directory} "
          f"({fetched} downloaded, {len(results) - fetched} already present)")
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
