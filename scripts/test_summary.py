"""Prints each suite's results and one closing line from meson's testlog.json files."""
import json
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
        suite = (t.get("suite") or ["?"])[0].split(":")[-1]
        result = t["result"]
        key = {"OK": "passed", "SKIP": "skipped", "EXPECTEDFAIL": "passed"}.get(result, "failed")
        per_suite[suite][key] += 1
        totals[key] += 1
        if key == "failed":
            print(f"  FAILED: {build} {t['name']} ({result})")
    for suite, c in sorted(per_suite.items()):
        print(f"{build} suite {suite}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
print(f"{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
