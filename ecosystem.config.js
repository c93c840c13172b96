// PM2 process file for the sidecar daemon:
//   scripts/setup && npx pm2 start ecosystem.config.js
//   npx pm2 logs sidecar        npx pm2 stop sidecar
//
// The daemon runs from the project's virtualenv (.venv/bin/python, made by scripts/setup).
// Every SIDECAR_* variable and provider key set in the shell that runs `pm2 start` is
// passed through; the CONTRACT.md variables not set there get their documented defaults.
// PM2-only knobs: SIDECAR_PM2_NAME (app name), SIDECAR_PM2_LOG_DIR (log files),
// SIDECAR_PM2_KILL_TIMEOUT_MS, SIDECAR_PM2_MAX_MEMORY.
"use strict";

const fs = require("fs");
const path = require("path");

const root = __dirname;
const python = path.join(root, ".venv", "bin", "python");
if (!fs.existsSync(python)) {
  throw new Error(`${python} not found: run scripts/setup first`);
}

const shell = process.env;
const dataHome = shell.XDG_DATA_HOME || path.join(require("os").homedir(), ".local", "share");

// CONTRACT.md variables and their defaults (unset ones keep the daemon's own default).
const contractDefaults = {
  SIDECAR_SYMBOLS: "AAPL,MSFT,NVDA,EURUSD,BTCUSD",
  SIDECAR_SOURCES: "yahoo,alphavantage,twelvedata,polygon",
  SIDECAR_TIMEFRAME: "1m",
  SIDECAR_DATA_DIR: path.join(dataHome, "sidecar"),
  SIDECAR_HTTP_HOST: "127.0.0.1",
  SIDECAR_HTTP_PORT: "8787",
  // SIDECAR_REDIS_URL (default: the embedded server), SIDECAR_SQLITE_PATH (in the data dir),
  // ALPHAVANTAGE_API_KEY, TWELVEDATA_API_KEY, POLYGON_API_KEY and the SIDECAR_*_BASE_URL
  // variables are passed when set.
};

const env = { ...contractDefaults, SIDECAR_LOG_FORMAT: "json", PYTHONUNBUFFERED: "1" };
for (const [key, value] of Object.entries(shell)) {
  if (key.startsWith("SIDECAR_") || key.endsWith("_API_KEY")) {
    env[key] = value;
  }
}

const logDir = shell.SIDECAR_PM2_LOG_DIR || path.join(env.SIDECAR_DATA_DIR, "logs");
// SIDECAR_SHARDS=N: N shards. With SIDECAR_REDIS_URL (one Redis they share, maybe a cluster)
// PM2 runs each shard as an instance of its own (NODE_APP_INSTANCE = i); without it one
// instance runs all N as its children on its embedded Redis (docs/operations.md, "Shards"),
// and PM2's instance index goes to a variable the daemon does not read.
const shards = Number(shell.SIDECAR_SHARDS || 1);
const pm2Shards = shards > 1 && Boolean(shell.SIDECAR_REDIS_URL);
const name = shell.SIDECAR_PM2_NAME || "sidecar";

module.exports = {
  apps: [
    {
      name,
      script: python,
      args: ["-m", "sidecar", "run"],
      interpreter: "none",
      cwd: root,
      instances: pm2Shards ? shards : 1,
      instance_var: pm2Shards || shards === 1 ? "NODE_APP_INSTANCE" : "SIDECAR_PM2_INSTANCE",
      exec_mode: "fork",
      env,
      // Restart whenever it dies (PM2 reports a SIGKILL as exit code 0, so no
      // stop_exit_codes), with exponential back-off: 100 ms doubling up to 15 s, reset
      // once it has run for 30 s. `pm2 stop` is a requested stop: no restart.
      autorestart: true,
      exp_backoff_restart_delay: 100,
      max_memory_restart: shell.SIDECAR_PM2_MAX_MEMORY || "1G",
      // `pm2 stop` sends SIGINT once (PM2_KILL_SIGNAL of the PM2 daemon), then waits this
      // long for the daemon to stop intake and flush SQLite before it sends SIGKILL.
      kill_timeout: Number(shell.SIDECAR_PM2_KILL_TIMEOUT_MS || 30000),
      // Only the daemon gets the signal: it stops its embedded Redis itself, after the flush.
      treekill: false,
      // Log files with a timestamp on every line (the daemon writes JSON lines to stderr).
      out_file: path.join(logDir, `${name}.out.log`),
      error_file: path.join(logDir, `${name}.err.log`),
      log_date_format: "YYYY-MM-DDTHH:mm:ss.SSSZ",
      merge_logs: true,
    },
  ],
};
