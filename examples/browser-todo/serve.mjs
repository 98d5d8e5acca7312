#!/usr/bin/env node
// A tiny static file server for the browser-todo example (and the browser tests): serves this
// folder at / and the built `weft` package (wasm/) at /weft/, on 127.0.0.1.
//
//   node examples/browser-todo/serve.mjs [--port 8080]
//
// A bundler (Vite, esbuild, webpack) would resolve `import ... from "weft"` itself; this page
// uses an import map instead, so it needs no build step.

import { createReadStream, statSync } from "node:fs";
import { createServer } from "node:http";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const packageDir = resolve(here, "../../wasm");

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".wasm": "application/wasm",
  ".png": "image/png",
  ".svg": "image/svg+xml",
  ".ts": "text/plain; charset=utf-8",
};

/**
 * Starts the server. `mounts` maps URL prefixes to folders (defaults: "/" this folder,
 * "/weft/" the package). Resolves to `{ url, close() }`.
 */
export function startServer({ port = 8080, host = "127.0.0.1", mounts = {} } = {}) {
  const table = Object.entries({ "/weft/": packageDir, ...mounts, "/": here }).sort(
    (a, b) => b[0].length - a[0].length,
  );
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const [prefix, root] = table.find(([p]) => path.startsWith(p)) ?? [];
    let file = root && normalize(join(root, path.slice(prefix.length)));
    if (!file || (file !== root && !file.startsWith(root + sep))) {
      res.writeHead(403).end("forbidden");
      return;
    }
    try {
      if (statSync(file).isDirectory()) file = join(file, "index.html");
      statSync(file);
    } catch {
      res.writeHead(404, { "content-type": "text/plain" }).end(`not found: ${path}`);
      return;
    }
    res.writeHead(200, {
      "content-type": TYPES[extname(file)] ?? "application/octet-stream",
      "cache-control": "no-store",
    });
    createReadStream(file).pipe(res);
  });
  return new Promise((resolvePromise, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      const { port: actual } = server.address();
      resolvePromise({
        url: `http://${host}:${actual}`,
        close: () =>
          new Promise((done) => {
            server.closeAllConnections?.();
            server.close(() => done());
          }),
      });
    });
  });
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const i = process.argv.indexOf("--port");
  const port = i > 0 ? Number(process.argv[i + 1]) : 8080;
  const { url } = await startServer({ port });
  console.log(`browser-todo: open ${url}/?relay=ws://127.0.0.1:7420 (Ctrl-C to stop)`);
}
