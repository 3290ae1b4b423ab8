"""The coinfer program from the outside: outputs, exit codes and one-line errors on bad input.

usage: test_cli.py PATH/TO/coinfer
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

COINFER = sys.argv[1]
HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.environ.get("COINFER_TEST_MODELS") or os.path.join(HERE, "..", "..", "..", "shared", "models")
STORIES = os.path.join(MODELS, "stories260K.gguf")
TALE = os.path.join(MODELS, "refs", "tale.txt")

failures = []
passed = 0


def run(*args, timeout=120):
    return subprocess.run([COINFER, *args], capture_output=True, text=True, timeout=timeout)


def check(name, cond, detail=""):
    global passed
    if cond:
        passed += 1
    else:
        failures.append(f"{name}: {detail}")
        print(f"FAIL {name}: {detail}")


def expect_error(name, args, codes=(1, 2), fragment=None):
    r = run(*args)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    ok = r.returncode in codes and len(lines) == 1 and r.returncode >= 0
    if fragment:
        ok = ok and fragment.lower() in r.stderr.lower()
    check(name, ok, f"rc={r.returncode} stderr={r.stderr!r}")


def gguf_bytes(arch, tensors):
    """A minimal GGUF v3 file: a llama-style config for `arch` and the given tensors."""
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    kv = [("general.architecture", 8, s(arch))]
    for k, v in [("context_length", 64), ("embedding_length", 256), ("block_count", 1),
                 ("feed_forward_length", 256), ("attention.head_count", 4), ("vocab_size", 256)]:
        kv.append((f"{arch}.{k}", 4, struct.pack("<I", v)))
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, t, v in kv:
        out += s(k) + struct.pack("<I", t) + v
    offset = 0
    blobs = []
    for name, ttype, ne, nbytes in tensors:
        out += s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", ttype, offset)
        blobs.append(nbytes)
        offset += (nbytes + 31) // 32 * 32
    out += b"\0" * ((32 - len(out) % 32) % 32)
    for n in blobs:
        out += b"\0" * ((n + 31) // 32 * 32)
    return out


def main():
    tmp = tempfile.mkdtemp()
    # Front end, no model needed.
    r = run("--help")
    check("help", r.returncode == 0 and "generate" in r.stdout, r.stdout)
    for sub in ["gguf", "tokenize", "generate", "perplexity"]:
        r = run(sub, "--help")
        check(f"{sub} --help", r.returncode == 0 and "usage" in r.stdout, r.stdout)
    expect_error("no command", [], codes=(2,))
    expect_error("unknown command", ["frobnicate"], codes=(2,))
    expect_error("unknown option", ["gguf", "--bogus", "x.gguf"], codes=(2,), fragment="--bogus")
    expect_error("missing file", ["gguf", os.path.join(tmp, "nope.gguf")], codes=(1,), fragment="nope.gguf")
    junk = os.path.join(tmp, "junk.gguf")
    with open(junk, "wb") as f:
        f.write(b"not a gguf file at all")
    expect_error("bad magic", ["gguf", junk], codes=(1,), fragment="magic")

    gpt2 = os.path.join(tmp, "gpt2.gguf")
    with open(gpt2, "wb") as f:
        f.write(gguf_bytes("gpt2", []))
    expect_error("unsupported architecture", ["generate", "-m", gpt2, "-p", "hi"], codes=(1,), fragment="gpt2")
    q8k = os.path.join(tmp, "q8k.gguf")
    with open(q8k, "wb") as f:  # Q8_K (type 15) is an activation type no model weight uses
        f.write(gguf_bytes("llama", [("token_embd.weight", 15, [256, 256], 256 * 292)]))
    expect_error("unsupported tensor type", ["generate", "-m", q8k, "-p", "hi", "--temp", "0"], codes=(1,), fragment="Q8_K")

    if not os.path.exists(STORIES):
        print(f"SKIP: the model tests need {os.path.normpath(STORIES)} (set COINFER_TEST_MODELS)")
        return finish()

    r = run("gguf", STORIES)
    check("gguf lists 48 tensors", r.returncode == 0 and "tensors: 48" in r.stdout, r.stdout[-500:])
    for frag in ["n_layer 5", "n_embd 64", "n_head 8", "n_head_kv 4", "vocab 512"]:
        check(f"gguf shows {frag}", frag in r.stdout, "")
    r = run("gguf", STORIES, "--json")
    j = json.loads(r.stdout)
    check("gguf --json", len(j["tensors"]) == 48 and j["model"]["n_layer"] == 5, "")

    r = run("tokenize", "-m", STORIES, "Once upon a time")
    check("tokenize", json.loads(r.stdout) == [1, 403, 407, 261, 378], r.stdout)
    r = run("tokenize", "-m", STORIES, "--no-bos", "Once upon a time")
    check("tokenize --no-bos", json.loads(r.stdout) == [403, 407, 261, 378], r.stdout)

    r = run("generate", "-m", STORIES, "-p", "Once upon a time", "-n", "16", "--temp", "0", "--json", "--logprobs", "3")
    j = json.loads(r.stdout)
    check("generate --json", r.returncode == 0 and j["ids"][:3] == [432, 383, 286] and j["finish_reason"] == "length"
          and len(j["top_logprobs"]) == 16 and len(j["top_logprobs"][0]) == 3
          and j["top_logprobs"][0][0][0] == 432 and "generated_tokens_per_s" in j["timing"], r.stdout)
    r = run("generate", "-m", STORIES, "-p", "Once upon a time", "-n", "64", "--temp", "0", "--stop", "Lily")
    check("generate --stop", r.returncode == 0 and r.stdout.rstrip("\n").endswith("a little girl named "), r.stdout)
    r = run("generate", "-m", STORIES, "-p", "Once upon a time", "-n", "8", "--seed", "5", "--temp", "1")
    r2 = run("generate", "-m", STORIES, "-p", "Once upon a time", "-n", "8", "--seed", "5", "--temp", "1")
    check("same seed, same text", r.returncode == 0 and r.stdout == r2.stdout, r.stdout + r2.stdout)

    long_prompt = "Once upon a time " * 40
    expect_error("prompt longer than the context", ["generate", "-m", STORIES, "-p", long_prompt, "-c", "32"], codes=(1,), fragment="context")
    expect_error("negative -n", ["generate", "-m", STORIES, "-p", "hi", "-n", "-1"], codes=(2,), fragment="-n")
    expect_error("NaN temperature", ["generate", "-m", STORIES, "-p", "hi", "--temp", "nan"], codes=(2,), fragment="temperature")
    expect_error("negative temperature", ["generate", "-m", STORIES, "-p", "hi", "--temp", "-1"], codes=(2,), fragment="temperature")
    expect_error("top-p 0", ["generate", "-m", STORIES, "-p", "hi", "--top-p", "0"], codes=(2,), fragment="top_p")
    expect_error("top-p 1.5", ["generate", "-m", STORIES, "-p", "hi", "--top-p", "1.5"], codes=(2,), fragment="top_p")
    expect_error("bad number", ["generate", "-m", STORIES, "-p", "hi", "-n", "ten"], codes=(2,), fragment="ten")
    expect_error("bad --kv-type", ["generate", "-m", STORIES, "-p", "hi", "--kv-type", "q4"], codes=(2,), fragment="q4")

    if os.path.exists(TALE):
        r = run("perplexity", "-m", STORIES, "-f", TALE, "-c", "128")
        last = r.stdout.strip().splitlines()[-1]
        check("perplexity c=128", r.returncode == 0 and last.startswith("PPL = 4.452"), last)
        ppl = float(last.split()[2])
        check("perplexity c=128 within 5e-4", abs(ppl - 4.4525) <= 5e-4, last)
        r = run("perplexity", "-m", STORIES, "-f", TALE, "-c", "64")
        ppl = float(r.stdout.strip().splitlines()[-1].split()[2])
        check("perplexity c=64 within 5e-4", abs(ppl - 5.1807) <= 5e-4, r.stdout[-100:])
        r = run("perplexity", "-m", STORIES, "-f", TALE, "-c", "128", "--device", "cpu", "--kv-type", "q8_0")
        ppl = float(r.stdout.strip().splitlines()[-1].split()[2])
        check("perplexity c=128 with q8_0 KV within 1% of 4.4525", abs(ppl - 4.4525) / 4.4525 < 0.01, r.stdout[-100:])
    return finish()


def finish():
    print(f"{passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
