// Browser test of the console: Debian's Chromium (headless, a fake microphone playing a
// 440 Hz tone) logs in to /console, places a call from the browser phone to a Rust echo
// agent, hears the echo (the page's measured dominant frequency), sees the call in the live
// view, saves docs/console.png, hangs up and sees the call among the ended ones. Then it
// waits at a number with the browser phone, where an agent on the Python SDK connects a
// simulated caller (PYTHON, default .venv/bin/python, with telcoflow installed), answers it
// and hears the caller.
//
// Run: node tests/browser/console.test.mjs (after `npm ci --prefix tests/browser` and
// `cargo build -p telcoflow-cli`). TELCOFLOW_BIN names the binary (default
// target/debug/telcoflow), CHROMIUM the browser (default /usr/bin/chromium). Without Chromium
// or sox the test is skipped, except under CI=true, where it fails.

import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "../..");
const PYTHON = process.env.PYTHON || join(ROOT, ".venv/bin/python");
const BIN = process.env.TELCOFLOW_BIN || join(ROOT, "target/debug/telcoflow");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SCREENSHOT = join(ROOT, "docs/console.png");
const UUID = "00000000-0000-4000-8000-000000000001";
const KEY = "dev-api-key";
const TONE_HZ = 440;
const CALLER_HZ = 660; // the simulated caller's tone, heard by the browser waiting at a number
const WAIT = 20_000; // longest any single step may take
const CI = process.env.CI === "true";

function unavailable(what) {
  if (CI) {
    console.error(`FAIL: ${what} (required under CI=true)`);
    process.exit(1);
  }
  console.log(`SKIP: ${what}`);
  process.exit(0);
}

const log = (msg) => console.log(`[console test] ${msg}`);

/** Spawns `cmd`, resolving with the process and the first stdout line matching `pattern`. */
function start(cmd, args, pattern, env = {}) {
  const child = spawn(cmd, args, {
    env: { ...process.env, RUST_LOG: "info", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const stderr = [];
  createInterface({ input: child.stderr }).on("line", (l) => {
    stderr.push(l);
    if (stderr.length > 200) stderr.shift();
  });
  child.lastLines = () => stderr.slice(-30).join("\n");
  child.what = `${cmd} ${args[0]}`;
  // Every stdout line, kept for waitLine.
  child.stdoutLines = [];
  child.lineWaiters = [];
  createInterface({ input: child.stdout }).on("line", (line) => {
    child.stdoutLines.push(line);
    for (const w of [...child.lineWaiters]) w(line);
  });
  if (!pattern) return Promise.resolve({ child, match: null });
  return waitLine(child, pattern).then((match) => ({ child, match }));
}

/** The first stdout line of `child` (printed so far or within WAIT) matching `pattern`. */
function waitLine(child, pattern) {
  return new Promise((ok, fail) => {
    const seen = child.stdoutLines.map((l) => l.match(pattern)).find(Boolean);
    if (seen) return ok(seen);
    const done = () => {
      clearTimeout(timer);
      child.lineWaiters = child.lineWaiters.filter((w) => w !== waiter);
      child.off("exit", onExit);
    };
    const timer = setTimeout(() => {
      done();
      fail(new Error(`${child.what}: no "${pattern}" in time\n${child.lastLines()}`));
    }, WAIT);
    const onExit = (code) => {
      done();
      fail(new Error(`${child.what} exited (${code})\n${child.lastLines()}`));
    };
    const waiter = (line) => {
      const m = line.match(pattern);
      if (m) {
        done();
        ok(m);
      }
    };
    child.lineWaiters.push(waiter);
    child.on("exit", onExit);
  });
}

async function main() {
  if (!existsSync(CHROMIUM)) unavailable(`no Chromium at ${CHROMIUM}`);
  if (spawnSync("sox", ["--version"]).error) unavailable("sox is not installed");
  assert.ok(existsSync(BIN), `no telcoflow binary at ${BIN}: cargo build -p telcoflow-cli`);

  const dir = mkdtempSync(join(tmpdir(), "telcoflow-console-"));
  const tone = join(dir, "tone.wav");
  // 48 kHz mono, as capture devices run; Chromium loops the file.
  const sox = spawnSync("sox", ["-n", "-r", "48000", "-c", "1", "-b", "16", tone, "synth", "10", "sine", String(TONE_HZ), "vol", "0.5"]);
  assert.equal(sox.status, 0, `sox: ${sox.stderr}`);
  const callerTone = join(dir, "caller.wav");
  const sox2 = spawnSync("sox", ["-n", "-r", "16000", "-c", "1", "-b", "16", callerTone, "synth", "8", "sine", String(CALLER_HZ), "vol", "0.5"]);
  assert.equal(sox2.status, 0, `sox: ${sox2.stderr}`);
  const pythonSdk = spawnSync(PYTHON, ["-c", "import telcoflow"]).status === 0;
  if (!pythonSdk && CI) throw new Error(`no Python with the telcoflow SDK at ${PYTHON} (required under CI=true)`);

  const procs = [];
  let browser = null;
  try {
    const server = await start(BIN, ["serve", "--listen", "127.0.0.1:0"], /listening on (ws:\/\/\S+)/);
    procs.push(server.child);
    const wsUrl = server.match[1];
    const httpUrl = wsUrl.replace(/^ws:/, "http:");
    log(`server at ${httpUrl}`);
    const agent = await start(BIN, ["agent", "echo", "--server", wsUrl, "--api-key", KEY, "--connector-uuid", UUID], null);
    procs.push(agent.child);

    const args = [
      "--use-fake-ui-for-media-stream",
      "--use-fake-device-for-media-stream",
      `--use-file-for-fake-audio-capture=${tone}`,
      "--autoplay-policy=no-user-gesture-required",
    ];
    // Chromium's sandbox cannot run as root (CI containers).
    if (process.getuid && process.getuid() === 0) args.push("--no-sandbox");
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args, timeout: WAIT });
    const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
    page.setDefaultTimeout(WAIT);
    page.on("console", (m) => log(`page: ${m.text()}`));
    page.on("pageerror", (e) => log(`page error: ${e.message}`));

    const response = await page.goto(`${httpUrl}/console`);
    assert.equal(response.status(), 200);
    assert.match(response.headers()["content-type"], /^text\/html/);

    // Wrong credentials: refused, and the page says why (the live view's close reason).
    await page.fill("#login-uuid", UUID);
    await page.fill("#login-key", "not-the-key");
    await page.click("#login-button");
    await page.waitForFunction(() => document.querySelector("#login-error").textContent.includes("wrong API key"));
    log("wrong key refused");

    await page.fill("#login-key", KEY);
    await page.click("#login-button");
    await page.waitForSelector("#app:not([hidden])");
    await page.waitForSelector("#link-state[data-state=live]");
    // The echo agent's control connection appears among the agents.
    await page.waitForSelector("#agents tbody tr:not(:has(td.empty))");
    log("logged in; the agent is connected");

    // No echo cancellation: the fake microphone must reach the agent unchanged.
    await page.uncheck("#phone-aec");
    await page.fill("#phone-to", "+15559990001");
    await page.click("#phone-dial");
    await page.waitForSelector("#phone-status[data-state=answered]");
    const callId = await page.getAttribute("#phone-status", "data-call-id");
    assert.ok(callId, "the phone shows its call id");
    log(`call ${callId} answered`);

    // The page hears the agent's echo of the tone.
    const heard = await page.waitForFunction(
      (hz) => {
        const f = Number(document.querySelector("#heard").dataset.frequency);
        return f > 0 && Math.abs(f - hz) / hz <= 0.1 ? f : null;
      },
      TONE_HZ,
      { polling: 100 },
    );
    const freq = await heard.jsonValue();
    log(`heard the echo at ${freq} Hz`);
    assert.ok(Math.abs(freq - TONE_HZ) / TONE_HZ <= 0.1);

    // The live view lists the call while it runs, answered, with the agent's media up and
    // the caller's tone on the level meter.
    // The screenshot waits for a couple of seconds of call, so that it shows some.
    const row = `#calls tbody tr[data-call-id="${callId}"]`;
    await page.waitForFunction((sel) => {
      const tr = document.querySelector(sel);
      // The duration reads "m:ss".
      const [m, s] = tr ? tr.cells[3].textContent.split(":").map(Number) : [NaN, NaN];
      return tr && tr.cells[2].textContent === "answered" && tr.cells[4].textContent === "media up"
        && Number(tr.cells[5].querySelector("meter").value) > -40 && m * 60 + s >= 2;
    }, row);
    const cells = await page.$$eval(`${row} td`, (tds) => tds.map((td) => td.textContent));
    assert.equal(cells[0], "+15550001");
    assert.equal(cells[1], "+15559990001");
    log(`live view: ${cells.join(" | ")}`);

    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    log(`screenshot saved to ${SCREENSHOT}`);

    await page.click("#phone-hangup");
    await page.waitForSelector("#phone-status[data-state=ended]");
    const ended = `#ended tbody tr[data-call-id="${callId}"]`;
    await page.waitForSelector(ended);
    await page.waitForSelector(`#calls tbody tr[data-call-id="${callId}"]`, { state: "detached" });
    const outcome = await page.$eval(`${ended} td:nth-child(3)`, (td) => td.textContent);
    assert.equal(outcome, "caller");
    log("the call is listed as ended by the caller");

    // Wait at a number: an agent on the Python SDK answers a simulated caller and connects it
    // to the development connector's `call.connect` destination, where the browser waits.
    if (!pythonSdk) {
      log("SKIP waiting at a number: no Python with the telcoflow SDK (PYTHON)");
    } else {
      agent.child.kill("SIGTERM");
      await page.waitForSelector("#agents tbody td.empty");
      const connector = await start(PYTHON, [join(HERE, "connect_agent.py"), wsUrl, KEY, UUID], /^ready$/);
      procs.push(connector.child);
      await page.waitForSelector("#agents tbody tr:not(:has(td.empty))");
      await page.fill("#phone-wait-number", "+15550100");
      await page.click("#phone-wait");
      await page.waitForSelector("#phone-status[data-state=waiting]");
      const caller = await start(BIN, ["call", "--server", wsUrl, "--from", "+15552220002", "--to", "+15550001", "--play", callerTone], null);
      procs.push(caller.child);
      await page.waitForSelector("#phone-status[data-state=incoming]");
      await page.click("#phone-answer");
      await page.waitForSelector("#phone-status[data-state=answered]");
      const connected = await page.getAttribute("#phone-status", "data-call-id");
      // The browser hears the caller's tone through the call.
      await page.waitForFunction(
        (hz) => Math.abs(Number(document.querySelector("#heard").dataset.frequency) - hz) / hz <= 0.1,
        CALLER_HZ,
        { polling: 100 },
      );
      await page.waitForFunction((sel) => {
        const tr = document.querySelector(sel);
        return tr && tr.cells[2].textContent === "connected" && tr.cells[0].textContent === "+15552220002";
      }, `#calls tbody tr[data-call-id="${connected}"]`);
      log(`waited at +15550100, answered call ${connected} and heard the caller`);
      // The caller hangs up at the end of its tone; the phone waits again until told to stop.
      await page.waitForSelector("#phone-status[data-state=ended]");
      await page.waitForSelector("#phone-status[data-state=waiting]");
      await page.click("#phone-hangup");
      await page.waitForSelector("#phone-status[data-state=idle]");
      await page.waitForSelector(`#ended tbody tr[data-call-id="${connected}"]`);
      log("the connected call ended; the phone stopped waiting");

      // DTMF: the browser dials the Python agent and presses 5; the agent prints the digit.
      // (The server passes on the caller's digits only, so the browser calls in here.)
      await page.fill("#phone-to", "+15559990001");
      await page.click("#phone-dial");
      await page.waitForSelector("#phone-status[data-state=answered]");
      await page.click("#dtmf button:nth-child(5)");
      await waitLine(connector.child, /^dtmf 5$/);
      log("the agent got the DTMF digit 5");
      await page.click("#phone-hangup");
      await page.waitForSelector("#phone-status[data-state=ended]");
    }
    console.log("PASS: console browser test");
  } finally {
    if (browser) await browser.close().catch(() => {});
    for (const p of procs) p.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  }
}

// Every wait above is bounded; this bounds the whole run as well.
const deadline = setTimeout(() => {
  console.error("FAIL: the console test took over 120 s");
  process.exit(1);
}, 120_000);
deadline.unref();

main().then(
  () => process.exit(0),
  (e) => {
    console.error(`FAIL: ${e.stack || e}`);
    process.exit(1);
  },
);
