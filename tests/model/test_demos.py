#!/usr/bin/env python3
"""Runs the demos on stories260K (CPU) and checks what they print.

usage: test_demos.py MULTI_CLIENT EMBED
Exit 0: pass, 1: fail, 77: skipped (the model file is missing).
"""
import os
import re
import subprocess
import sys


def model_path():
    d = os.environ.get("COINFER_TEST_MODELS")
    if not d:
        root = os.environ.get("COINFER_SOURCE_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))
        d = os.path.join(root, "..", "shared", "models")
    return os.path.normpath(os.path.join(d, "stories260K.gguf"))


failures = []


def check(cond, what, out=""):
    if cond:
        print(f"ok: {what}")
    else:
        failures.append(what)
        print(f"FAIL: {what}\n--- output ---\n{out}\n--------------")


def run(cmd, timeout=120):
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 1
    multi_client, embed = sys.argv[1], sys.argv[2]
    model = model_path()
    if not os.path.isfile(model):
        print(f"SKIP: test model {model} not found (set COINFER_TEST_MODELS)")
        return 77

    # Eight clients, plain output: each one's completion is reported.
    base = [multi_client, "-m", model, "--plain", "-c", "8", "-n", "48", "--device", "cpu"]
    rc, out, err = run(base)
    check(rc == 0, f"multi_client exits 0 (got {rc})", out + err)
    done = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"^client (\d+): done, (\d+) tokens", out, re.M)}
    check(sorted(done) == list(range(8)), f"a done line for each of the 8 clients (got {sorted(done)})", out + err)
    check(all(0 < n <= 48 for n in done.values()), f"each client made 1..48 tokens ({done})", out)
    check(re.search(r"^total: \d+ tokens", out, re.M) is not None, "a total throughput line", out)
    # Each story runs from its "=== client i: PROMPT" line to the next one (it may hold newlines).
    body = out.split("\nsummary (")[0]
    stories = [b.split("\n", 1)[1] if "\n" in b else "" for b in re.split(r"^=== client \d+: ", body, flags=re.M)[1:]]
    check(len(stories) == 8 and all(s.strip() for s in stories), "eight non-empty stories", out)

    # Fixed seed: the same stories again (samples do not depend on batch company).
    rc2, out2, _ = run(base)
    strip = lambda s: re.sub(r"[\d.]+ tok/s|in [\d.]+s", "", s)
    check(rc2 == 0 and strip(out2) == strip(out), "a second run with the same seed prints the same stories",
          out2)

    # --duration-s stops long generations early, cancels the clients and still exits 0.
    rc, out, err = run([multi_client, "-m", model, "--plain", "-c", "4", "-n", "1900", "--device", "cpu",
                        "--duration-s", "0.3"])
    lines = re.findall(r"^client \d+: (\w+), (\d+) tokens", out, re.M)
    check(rc == 0 and len(lines) == 4, f"multi_client --duration-s exits 0 with 4 client lines (rc {rc})", out + err)
    check(any(s == "cancelled" for s, _ in lines), "--duration-s 0.3 cancels unfinished clients", out)

    # Bad input gives a message, not a crash.
    rc, out, err = run([multi_client, "-m", model, "-c", "0"])
    check(rc == 2 and "clients" in err, f"multi_client -c 0 is a usage error (rc {rc})", out + err)
    rc, out, err = run([embed, model + ".missing"])
    check(rc == 1 and ".missing" in err, f"embed on a missing file says so (rc {rc})", out + err)

    # embed: both coroutines print text.
    rc, out, err = run([embed, model])
    check(rc == 0, f"embed exits 0 (got {rc})", out + err)
    m1 = re.search(r"^\[stream\] Once upon a time(.+?) \(finish=\w+\)$", out, re.M | re.S)
    m2 = re.search(r"^\[complete\] The little dog(.+?) \(\d+ tokens, finish=\w+", out, re.M | re.S)
    check(m1 is not None and m1.group(1).strip() != "", "embed streams non-empty text", out + err)
    check(m2 is not None and m2.group(1).strip() != "", "embed's async_complete returns non-empty text", out + err)

    if failures:
        print(f"{len(failures)} check(s) failed: {failures}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
