"""Prints each suite's results and one closing line from meson's testlog.json files.

A test executable that ran doctest cases also reports how many cases passed inside it.
"""
import json
import re
import sys
from collections import defaultdict

totals = defaultdict(int)
for path in sys.argv[1:]:
    build = path.split("/")[0]
    per_suite = defaultdict(lambda: defaultdict(int))
    try:
        lines = open(path).read().splitlines()
    except OSError:
        print(f"{build}: no test log")
        totals["failed"] += 1
        continue
    for line in lines:
        t = json.loads(line)
        suite_part, _, name = t["name"].partition(" / ")
        suite = suite_part.split(":")[-1] or "?"
        result = t["result"]
        key = {"OK": "passed", "SKIP": "skipped", "EXPECTEDFAIL": "passed"}.get(result, "failed")
        per_suite[suite][key] += 1
        totals[key] += 1
        cases = re.findall(r"test cases:\s*(\d+) \|\s*(\d+) passed \|\s*(\d+) failed", t.get("stdout") or "")
        for n, ok, bad in cases:
            per_suite[suite]["cases"] += int(n)
            totals["cases"] += int(n)
        if key == "failed":
            print(f"  FAILED: {build} {name} ({result})")
        elif key == "skipped":
            print(f"  skipped: {build} {name}")
    for suite, c in sorted(per_suite.items()):
        print(f"{build} suite {suite}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
              f" ({c['cases']} doctest cases)")
print(f"{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
