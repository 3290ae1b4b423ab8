#!/usr/bin/env python3
"""coinfer bench and coinfer synth on the CPU: short runs on synthetic:tiny, output checked.

usage: test_bench.py COINFER
The --vocab part (synth with the llama-spm vocabulary, then gguf and generate on the file) is
skipped with a SKIP message when the vocab file is missing.
Exit 0: pass, 1: fail.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

passed = 0
failures = []


def check(cond, what, out=""):
    global passed
    if cond:
        passed += 1
        print(f"ok: {what}")
    else:
        failures.append(what)
        print(f"FAIL: {what}\n--- output ---\n{out}\n--------------")


def run(cmd, timeout=180):
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def vocab_path():
    d = os.environ.get("COINFER_TEST_MODELS")
    if not d:
        root = os.environ.get("COINFER_SOURCE_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))
        d = os.path.join(root, "..", "shared", "models")
    return os.path.normpath(os.path.join(d, "vocab", "ggml-vocab-llama-spm.gguf"))


def number(text, label):
    m = re.search(re.escape(label) + r"\s+([0-9.]+)", text)
    return float(m.group(1)) if m else None


def test_serve(exe, tmp):
    base = [exe, "bench", "--model", "synthetic:tiny", "--device", "cpu", "--requests", "8",
            "--concurrency", "4", "--prompt-len", "24", "--gen-len", "12"]
    rc, out, err = run(base)
    check(rc == 0, "bench serve exits 0", out + err)
    for field in ["output tok/s:", "total tok/s:", "requests/s:", "TTFT", "ITL", "peak batch:", "KV use:",
                  "preemptions:", "GB/s", "GFLOP/s"]:
        check(field in out, f"bench serve prints '{field}'", out)
    check("8 ok, 0 failed" in out, "bench serve: all 8 requests finish", out)
    tps = number(out, "output tok/s:")
    check(tps is not None and tps > 0, "bench serve: output tok/s > 0", out)
    pb = re.search(r"peak batch:\s+(\d+)", out)
    check(pb is not None and 1 <= int(pb.group(1)) <= 4, "bench serve: peak batch within the concurrency", out)

    # --json FILE, and --json alone (JSON on stdout, text on stderr); ranges and Poisson arrivals.
    jf = os.path.join(tmp, "serve.json")
    rc, out, err = run(base + ["--json", jf])
    check(rc == 0 and os.path.exists(jf), "bench serve --json FILE writes the file", out + err)
    if os.path.exists(jf):
        j = json.load(open(jf))
        for k in ["output_tokens_per_s", "total_tokens_per_s", "requests_per_s", "ttft_ms", "itl_ms",
                  "peak_batch_seqs", "kv_blocks_peak", "preemptions", "achieved", "model"]:
            check(k in j, f"serve JSON has '{k}'", json.dumps(j)[:2000])
        check(j.get("output_tokens") == 8 * 12, "serve JSON: 8 x 12 output tokens (ignore_eos)", json.dumps(j)[:2000])
        check(all(q in j.get("itl_ms", {}) for q in ["p50", "p90", "p99"]), "serve JSON: ITL p50/p90/p99")
    rc, out, err = run([exe, "bench", "-m", "synthetic:tiny", "--device", "cpu", "-n", "6", "--rate", "200",
                        "--prompt-len-range", "4:16", "--gen-len-range", "2:6", "--json"])
    try:
        j = json.loads(out)
    except ValueError:
        j = {}
    check(rc == 0 and j.get("mode") == "serve" and j.get("requests_ok") == 6,
          "bench serve --rate with ranges, --json to stdout", out + err)
    check("output tok/s:" in err, "bench --json on stdout sends the text to stderr", err)
    n_out = j.get("output_tokens", 0)
    check(6 * 2 <= n_out <= 6 * 6, "serve: output tokens within the --gen-len-range", str(n_out))


def test_batched(exe, tmp):
    jf = os.path.join(tmp, "batched.json")
    rc, out, err = run([exe, "bench", "--model", "synthetic:tiny", "--device", "cpu", "--mode", "batched",
                        "--batches", "1,4", "--pp", "16", "--tg", "8", "--json", jf])
    check(rc == 0, "bench batched exits 0", out + err)
    check("S_PP t/s" in out and "S_TG t/s" in out, "bench batched prints the S_PP / S_TG table", out)
    rows = re.findall(r"^\|\s+16 \|\s+8 \|\s+(\d+) \|", out, re.M)
    check(rows == ["1", "4"], "bench batched: one row per B", out)
    j = json.load(open(jf)) if os.path.exists(jf) else {}
    res = j.get("results", [])
    check(len(res) == 2 and all(r["s_pp"] > 0 and r["s_tg"] > 0 for r in res), "batched JSON: S_PP and S_TG > 0",
          json.dumps(j)[:2000])
    check(len(res) == 2 and res[1]["n_kv"] == 4 * 24, "batched JSON: N_KV = B x (pp + tg)", json.dumps(res)[:2000])
    rc, out, err = run([exe, "bench", "--model", "synthetic:tiny:q4_k", "--device", "cpu", "--mode", "batched",
                        "--batches", "2", "--pp", "8", "--tg", "4"])
    check(rc == 0 and "S_TG" in out, "bench batched on synthetic:tiny:q4_k", out + err)
    rc, out, err = run([exe, "bench", "--model", "synthetic:tiny:q5_k_m", "--device", "cpu", "--mode", "batched",
                        "--batches", "2", "--pp", "8", "--tg", "4"])
    check(rc == 0 and "S_TG" in out, "bench batched on synthetic:tiny:q5_k_m", out + err)


def test_errors(exe):
    rc, out, err = run([exe, "bench", "--model", "synthetic:nope", "--device", "cpu"])
    check(rc == 1 and "unknown synthetic shape" in err, "unknown shape is an error naming it", err)
    rc, out, err = run([exe, "bench", "--model", "synthetic:tiny:q5_0", "--device", "cpu"])
    check(rc == 1 and "q5_0" in err, "unknown type is an error naming it", err)
    rc, out, err = run([exe, "bench", "--model", "synthetic:tiny", "--mode", "fast"])
    check(rc == 2, "bad --mode is a usage error", err)
    rc, out, err = run([exe, "synth", "tiny", "f16"])
    check(rc == 2, "synth without -o is a usage error", err)


def test_synth(exe, tmp):
    # Without a vocab: the built-in tokenizer; the file generates the same ids as the in-memory model.
    f = os.path.join(tmp, "tiny-f16.gguf")
    rc, out, err = run([exe, "synth", "tiny", "f16", "-o", f])
    check(rc == 0 and os.path.exists(f), "synth tiny f16 writes a file", out + err)
    gen = [exe, "generate", "-p", "hello world", "-n", "8", "--temp", "0", "--json", "--device", "cpu"]
    rc1, out1, err1 = run(gen + ["-m", f])
    rc2, out2, err2 = run(gen + ["-m", "synthetic:tiny"])
    ok = rc1 == 0 and rc2 == 0 and json.loads(out1)["ids"] == json.loads(out2)["ids"]
    check(ok, "the synth file and synthetic:tiny generate the same ids", out1 + err1 + out2 + err2)

    vocab = vocab_path()
    if not os.path.exists(vocab):
        print(f"SKIP: {vocab} is missing; the --vocab checks are skipped")
        return
    f = os.path.join(tmp, "tiny-q4_0.gguf")
    rc, out, err = run([exe, "synth", "tiny", "q4_0", "-o", f, "--vocab", vocab])
    check(rc == 0 and os.path.exists(f), "synth tiny q4_0 --vocab writes a file", out + err)
    rc, out, err = run([exe, "gguf", f])
    check(rc == 0, "coinfer gguf reads the synth file", out + err)
    for name in ["token_embd.weight", "blk.1.ffn_down.weight", "output.weight", "tokenizer.ggml.tokens"]:
        check(name in out, f"coinfer gguf lists {name}", out)
    check(re.search(r"blk\.0\.attn_q\.weight\s+Q4_0", out) is not None, "matrices are Q4_0", out)
    check(re.search(r"llama\.vocab_size\s+uint32\s+32000", out) is not None, "tiny adopts the vocab's 32000 tokens", out)
    rc, out, err = run([exe, "generate", "-m", f, "-p", "hello", "-n", "8", "--temp", "0", "--device", "cpu"])
    check(rc == 0, "coinfer generate on the synth file exits 0", out + err)
    # llama-quantize's Q4_K_M choices on 2 layers: Q6_K for output, blk.1.attn_v and blk.1.ffn_down
    # (use_more_bits picks layer 1 of 2), Q4_K elsewhere; file type 15 (MOSTLY_Q4_K_M).
    f = os.path.join(tmp, "tiny-q4_k_m.gguf")
    rc, out, err = run([exe, "synth", "tiny", "q4_k_m", "-o", f])
    check(rc == 0 and os.path.exists(f), "synth tiny q4_k_m writes a file", out + err)
    rc, out, err = run([exe, "gguf", f])
    want = {"output.weight": "Q6_K", "token_embd.weight": "Q4_K", "blk.0.attn_v.weight": "Q4_K",
            "blk.1.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K",
            "blk.1.ffn_up.weight": "Q4_K", "blk.1.attn_q.weight": "Q4_K"}
    for name, t in want.items():
        check(re.search(re.escape(name) + r"\s+" + t + r"\s", out) is not None, f"q4_k_m: {name} is {t}", out)
    check(re.search(r"general\.file_type\s+uint32\s+15", out) is not None, "q4_k_m: general.file_type 15", out)
    rc, out, err = run([exe, "generate", "-m", f, "-p", "hello", "-n", "4", "--temp", "0", "--device", "cpu"])
    check(rc == 0, "coinfer generate on the q4_k_m file exits 0", out + err)
    rc, out, err = run([exe, "synth", "llama2-7b", "q4_0", "-o", os.path.join(tmp, "x.gguf"), "--vocab",
                        os.path.join(os.path.dirname(vocab), "ggml-vocab-gpt-2.gguf")])
    check(rc == 1 and "needs 32000" in err, "a vocab of the wrong size is an error for the real shapes", err)


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    exe = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        test_serve(exe, tmp)
        test_batched(exe, tmp)
        test_errors(exe)
        test_synth(exe, tmp)
    print(f"{passed} passed, {len(failures)} failed")
    for f in failures:
        print(f"  failed: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
