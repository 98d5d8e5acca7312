// Test helpers: the native `weft` binary (relay and CLI replicas) as real processes.
// Everything listens on 127.0.0.1 and is stopped by the test that started it.

import { execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const wasmDir = join(repoRoot, "wasm");

/** The `weft` binary built by `cargo build`/`cargo test`: $WEFT_BIN, else the target dir's. */
export function weftBin() {
  const bin =
    process.env.WEFT_BIN ??
    join(resolve(repoRoot, process.env.CARGO_TARGET_DIR ?? "target"), "debug", "weft");
  if (!existsSync(bin)) {
    throw new Error(`weft binary not found at ${bin}: run cargo build first, or set WEFT_BIN`);
  }
  return bin;
}

/** A temporary directory removed by `cleanup()`. */
export function tempDir(prefix = "weft-js-") {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Runs `weft ARGS`; resolves to stdout, rejects with stderr on a non-zero exit. */
export function weft(args, { timeout = 60_000, env } = {}) {
  return new Promise((resolve, reject) => {
    execFile(
      weftBin(),
      args,
      { timeout, env: { ...process.env, ...env }, maxBuffer: 64 << 20 },
      (error, stdout, stderr) => {
        if (error) {
          error.message = `weft ${args.join(" ")} failed (${error.code ?? error.signal}): ${stderr}`;
          error.stderr = stderr;
          reject(error);
        } else resolve(stdout);
      },
    );
  });
}

/**
 * Starts `weft serve` on 127.0.0.1 with a fresh data directory (and `--auth-secret-file`
 * when `secret` is given). Resolves to `{url, stop(), restart()}` once it printed its address.
 */
export async function startRelay({ secret, listen = "127.0.0.1:0", data } = {}) {
  const tmp = data ? null : tempDir("weft-relay-");
  const dataDir = data ?? tmp.dir;
  const args = ["serve", "--listen", listen, "--data", dataDir];
  let secretFile;
  if (secret) {
    secretFile = join(dataDir, "relay.secret");
    writeFileSync(secretFile, secret);
    args.push("--auth-secret-file", secretFile);
  }
  const child = spawn(weftBin(), args, { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr += d;
  });
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  const url = await new Promise((resolve, reject) => {
    const lines = createInterface({ input: child.stdout });
    const timer = setTimeout(() => reject(new Error(`relay did not start in 20 s: ${stderr}`)), 20_000);
    lines.once("line", (line) => {
      clearTimeout(timer);
      const m = /listening on (ws:\/\/\S+)/.exec(line);
      if (m) resolve(m[1]);
      else reject(new Error(`unexpected first line from weft serve: ${line}`));
    });
    exited.then(({ code }) => {
      clearTimeout(timer);
      reject(new Error(`weft serve exited (${code}) before listening: ${stderr}`));
    });
  });
  const relay = {
    url,
    pid: child.pid,
    dataDir,
    secretFile,
    /** Stops the relay (SIGTERM, then SIGKILL after 5 s) and waits for the exit. */
    async stop({ keepData = false } = {}) {
      if (child.exitCode == null && child.signalCode == null) {
        child.kill("SIGTERM");
        const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
        await exited;
        clearTimeout(timer);
      }
      if (!keepData) tmp?.cleanup();
    },
    /** The value of metric `name` on the relay's /metrics page, or undefined. */
    async metric(name) {
      const page = new URL(url);
      page.protocol = "http:";
      page.pathname = "/metrics";
      const text = await (await fetch(page)).text();
      const m = new RegExp(`^${name} (\\S+)$`, "m").exec(text);
      return m ? Number(m[1]) : undefined;
    },
    /** A token for this relay (`weft token issue`). */
    token({ sub = "test", read = "*", write = "*", ttl } = {}) {
      const args = ["token", "issue", "--secret-file", secretFile, "--sub", sub, "--read", read, "--write", write];
      if (ttl) args.push("--ttl", ttl);
      return weft(args).then((out) => out.trim());
    },
  };
  return relay;
}

/** Restarts a stopped relay on the same address and data. */
export async function restartRelay(relay) {
  const listen = new URL(relay.url).host;
  const again = await startRelay({ listen, data: relay.dataDir, secret: undefined });
  return again;
}

/** A native CLI replica in its own database file. */
export class CliReplica {
  constructor(dir, name = "cli") {
    this.db = join(dir, `${name}.db`);
  }
  run(args) {
    return weft(["--db", this.db, ...args]);
  }
  async create(collection, body) {
    return (await this.run(["doc", "create", "--collection", collection, "--json", JSON.stringify(body)])).trim();
  }
  async update(id, patch) {
    await this.run(["doc", "update", id, "--merge", JSON.stringify(patch)]);
  }
  async delete(id) {
    await this.run(["doc", "delete", id]);
  }
  /** `{id, collection, heads, body}` (heads sorted), or null when deleted/missing. */
  async get(id) {
    try {
      const doc = JSON.parse(await this.run(["doc", "get", id, "--meta"]));
      doc.heads = [...doc.heads].sort();
      return doc;
    } catch (e) {
      if (/not found|deleted/i.test(e.stderr ?? "")) return null;
      throw e;
    }
  }
  /** The live documents of a collection: `[{id, collection, body}]`. */
  async list(collection) {
    const out = await this.run(["doc", "list", ...(collection ? ["--collection", collection] : []), "--json"]);
    return out
      .split("\n")
      .filter((l) => l.trim())
      .flatMap((l) => {
        const v = JSON.parse(l);
        return Array.isArray(v) ? v : [v];
      });
  }
  sync(url, { token } = {}) {
    return this.run(["sync", "--server", url, "--once", "--timeout", "60", ...(token ? ["--token", token] : [])]);
  }
}
