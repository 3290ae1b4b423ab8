// Shared by the Node tests of `coinfer serve`: argument handling, loading packages from
// tests/server/node/node_modules, starting the server on a free port and stopping it.
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const SKIP = 77;  // meson's exit code for a skipped test
const here = dirname(fileURLToPath(import.meta.url));

// argv: COINFER_EXE [NODE_DIR]; NODE_DIR holds node_modules (default tests/server/node).
export function parse_args() {
  const [exe, node_dir] = process.argv.slice(2);
  if (!exe) {
    console.error("usage: node TEST.mjs COINFER_EXE [NODE_DIR]");
    process.exit(2);
  }
  return { exe: resolve(exe), node_dir: resolve(node_dir || join(here, "node")) };
}

// require() rooted at NODE_DIR, or a skip when the package is not installed.
export function require_package(node_dir, name) {
  if (!existsSync(join(node_dir, "node_modules", name))) {
    console.log(`SKIP: ${name} is not installed in ${node_dir}/node_modules ` +
                `(npm ci --prefix ${node_dir})`);
    process.exit(SKIP);
  }
  return createRequire(join(node_dir, "package.json"))(name);
}

// The shared test model, or a skip.
export function model_path(rel = "stories260K.gguf") {
  const dir = process.env.COINFER_TEST_MODELS || join(here, "..", "..", "..", "shared", "models");
  const p = resolve(dir, rel);
  if (!existsSync(p)) {
    console.log(`SKIP: test model ${p} not found (set COINFER_TEST_MODELS)`);
    process.exit(SKIP);
  }
  return p;
}

// Starts `coinfer serve` on port 0 and resolves with {url, proc, stop()} once it prints
// "listening on http://HOST:PORT".
export function start_server(exe, model, extra_args = [], timeout_ms = 60000) {
  const args = ["serve", "-m", model, "--host", "127.0.0.1", "--port", "0", "--device", "cpu", ...extra_args];
  const proc = spawn(exe, args, { stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  let exited = null;
  proc.on("exit", (code, signal) => { exited = { code, signal }; });
  const stop = () => new Promise((res) => {
    if (exited) return res();
    const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
    proc.on("exit", () => { clearTimeout(t); res(); });
    proc.kill("SIGTERM");
  });
  return new Promise((res, rej) => {
    const timer = setTimeout(() => {
      stop();
      rej(new Error(`coinfer serve printed no "listening on" line in ${timeout_ms} ms; output:\n${log}`));
    }, timeout_ms);
    const on_data = (buf) => {
      log += buf.toString();
      const m = log.match(/listening on (http:\/\/[^\s/]+)/);
      if (m) {
        clearTimeout(timer);
        res({ url: m[1], proc, stop, log: () => log });
      }
    };
    proc.stdout.on("data", on_data);
    proc.stderr.on("data", on_data);
    proc.on("exit", (code, signal) => {
      clearTimeout(timer);
      rej(new Error(`coinfer serve exited (code ${code}, signal ${signal}) before listening; output:\n${log}`));
    });
    proc.on("error", (e) => { clearTimeout(timer); rej(e); });
  });
}

// A tiny test runner: named async checks, each pass or fail, then "N passed, N failed".
export class Runner {
  constructor() { this.n_passed = 0; this.n_failed = 0; }
  async run(name, fn) {
    try {
      await fn();
      this.n_passed++;
      console.log(`ok   ${name}`);
    } catch (e) {
      this.n_failed++;
      console.log(`FAIL ${name}: ${e && e.stack ? e.stack : e}`);
    }
  }
  finish() {
    console.log(`${this.n_passed} passed, ${this.n_failed} failed`);
    return this.n_failed === 0 ? 0 : 1;
  }
}

export function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

export function check_eq(actual, expected, what) {
  const a = JSON.stringify(actual), e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${what}: expected ${e}, got ${a}`);
}
