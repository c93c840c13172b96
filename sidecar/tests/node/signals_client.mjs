// A client of the daemon's HTTP API in Node.js (20+: global fetch, no packages).
//   node signals_client.mjs http://127.0.0.1:8787 [SYMBOLS]
// Reads /v1/signals (with SIDECAR_HTTP_TOKEN as a bearer token when set) and prints
// one JSON object per signal, as `python -m sidecar scan --signals --json` does.
const [base, symbols] = process.argv.slice(2);
const url = new URL("/v1/signals", base);
if (symbols) url.searchParams.set("symbols", symbols);
const headers = {};
if (process.env.SIDECAR_HTTP_TOKEN) headers.Authorization = `Bearer ${process.env.SIDECAR_HTTP_TOKEN}`;
const resp = await fetch(url, { headers });
if (!resp.ok) {
  console.error(`HTTP ${resp.status}: ${await resp.text()}`);
  process.exit(1);
}
const { signals } = await resp.json();
for (const s of signals) console.log(JSON.stringify(s));
