"""One combined table of the headline figures of every benchmark JSON in a folder.

Each benchmark writes a "summary" list of {"what", "value", "unit"} rows into its JSON; this prints
them together, so a whole `run_all.sh` run ends with one short table.

    python bench/summary.py [DIR]      # default: $OUT, else bench/results
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from bench.common import BENCH_DIR, fmt

ORDER = ("attention", "logprobs_memory", "train_step", "decode_attention", "generate", "rollouts", "rl_step")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default=os.environ.get("OUT") or os.path.join(BENCH_DIR, "results"))
    folder = p.parse_args(argv).folder
    reports = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as fh:
            data = json.load(fh)
        if "summary" in data:
            reports[os.path.basename(path).removesuffix(".json")] = data
    if not reports:
        sys.exit(f"no benchmark JSON with a summary in {folder}")
    names = sorted(reports, key=lambda b: (ORDER.index(b) if b in ORDER else len(ORDER), b))
    device = next(iter(reports.values()))["device"]
    print(f"\nminirl benchmarks on {device.get('name')} (torch {device.get('torch')}), from {folder}")
    rows = [(b, r["what"], fmt(r["value"]) + (f" {r['unit']}" if r["unit"] else "")) for b in names
            for r in reports[b]["summary"]]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}")


if __name__ == "__main__":
    main()
