// Starts the three real fairgate services for a browser test (free ports, a private database
// and Redis prefix, fresh keys and tokens), creates events through the organizer API, and
// launches Debian's Chromium through playwright-core. Every service's log and every screenshot
// goes to FAIRGATE_E2E_ARTIFACTS.
import { spawn, execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { chromium } from "playwright-core";

const hex = (bytes) => crypto.randomBytes(bytes).toString("hex");
export const ARTIFACTS = process.env.FAIRGATE_E2E_ARTIFACTS || path.resolve("target/e2e-artifacts");
const BIN = process.env.FAIRGATE_E2E_BIN || path.resolve("target/debug");
const ADMIN_URL = process.env.FAIRGATE_TEST_DATABASE_URL || "postgres://postgres@127.0.0.1:5432/postgres";
const REDIS_URL = process.env.FAIRGATE_TEST_REDIS_URL || "redis://127.0.0.1:6379";

async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** The same server's URL for another database. */
function databaseUrl(admin, name) {
  const url = new URL(admin);
  url.pathname = "/" + name;
  return url.toString();
}

async function waitReady(name, url, child) {
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline) {
    if (child.exitCode != null) throw new Error(`${name} exited with ${child.exitCode}: see ${ARTIFACTS}/${name}.log`);
    try {
      if ((await fetch(`${url}/readyz`)).ok) return;
    } catch { /* not listening yet */ }
    await new Promise((r) => setTimeout(r, 150));
  }
  throw new Error(`${name} did not become ready: see ${ARTIFACTS}/${name}.log`);
}

export async function startFairgate() {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const tag = hex(6);
  const db = `fgtest_e2e_${tag}`;
  execFileSync("psql", [ADMIN_URL, "-qc", `CREATE DATABASE ${db}`]);
  const ports = { buffer: await freePort(), queue: await freePort(), purchase: await freePort() };
  const urls = Object.fromEntries(Object.entries(ports).map(([k, p]) => [k, `http://127.0.0.1:${p}`]));
  const tokens = { organizer: `organizer-${hex(12)}`, operator: `operator-${hex(12)}` };
  const env = {
    ...process.env,
    DATABASE_URL: databaseUrl(ADMIN_URL, db),
    REDIS_URL,
    FAIRGATE_REDIS_PREFIX: `fge2e${tag}`,
    FAIRGATE_DB_MAX_CONNECTIONS: "5",
    FAIRGATE_BUFFER_BIND: `127.0.0.1:${ports.buffer}`,
    FAIRGATE_QUEUE_BIND: `127.0.0.1:${ports.queue}`,
    FAIRGATE_PURCHASE_BIND: `127.0.0.1:${ports.purchase}`,
    FAIRGATE_BUFFER_PUBLIC_URL: urls.buffer,
    FAIRGATE_QUEUE_PUBLIC_URL: urls.queue,
    FAIRGATE_PURCHASE_PUBLIC_URL: urls.purchase,
    FAIRGATE_JWKS_URL: `${urls.queue}/.well-known/jwks.json`,
    FAIRGATE_SIGNING_KEY: hex(32),
    FAIRGATE_ORDER_SECRET: hex(32),
    FAIRGATE_ORGANIZER_TOKEN: tokens.organizer,
    FAIRGATE_OPERATOR_TOKENS: `e2e-operator:${tokens.operator}`,
    FAIRGATE_ADMISSION_TICK_MS: "100",
    FAIRGATE_DRAW_TICK_MS: "200",
    FAIRGATE_REFRESH_MS: "300",
    LOG_FORMAT: "json",
  };
  const children = [];
  for (const name of ["buffer", "queue", "purchase"]) {
    const log = fs.openSync(path.join(ARTIFACTS, `${name}.log`), "a");
    const child = spawn(path.join(BIN, name), [], { env, stdio: ["ignore", log, log] });
    children.push(child);
    // One at a time: the first applies the migrations.
    await waitReady(name, urls[name], child);
  }

  async function api(method, url, body, token) {
    const r = await fetch(url, {
      method,
      headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) },
      body: body == null ? undefined : JSON.stringify(body),
    });
    const answer = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(`${method} ${url} → ${r.status} ${JSON.stringify(answer)}`);
    return answer;
  }

  return {
    urls,
    tokens,
    api,
    /** Creates an event whose presale is open now and whose draw is `drawInSecs` away. */
    async createEvent({ name = "E2E night", sections, drawInSecs = 6, rate = 600, maxActive = 100, seatsPerFan = 4 } = {}) {
      const now = Date.now();
      return api("POST", `${urls.purchase}/api/v1/organizer/events`, {
        name, venue: "Test Hall", city: "Lyon", category: "concert",
        description: "A sale driven by the browser tests.",
        starts_at: new Date(now + 30 * 86400_000).toISOString(),
        sale: {
          presale_opens_at: new Date(now - 1000).toISOString(),
          sale_starts_at: new Date(now + drawInSecs * 1000).toISOString(),
          sale_ends_at: new Date(now + 86400_000).toISOString(),
          rate_per_minute: rate, max_active: maxActive, seats_per_fan: seatsPerFan, anonymous_allowed: true,
        },
        seat_map: { sections: sections || [{ name: "Stalls", rows: 2, seats_per_row: 6, price_cents: 4500 }] },
      }, tokens.organizer);
    },
    async stop() {
      for (const child of children) child.kill("SIGTERM");
      await Promise.all(children.map((c) => c.exitCode != null ? null : new Promise((r) => c.once("exit", r))));
      try { execFileSync("psql", [ADMIN_URL, "-qc", `DROP DATABASE IF EXISTS ${db} WITH (FORCE)`]); } catch { /* dropped by the next run */ }
      try {
        const keys = execFileSync("redis-cli", ["-u", REDIS_URL, "--scan", "--pattern", `fge2e${tag}*`]).toString().split("\n").filter(Boolean);
        for (let i = 0; i < keys.length; i += 500) execFileSync("redis-cli", ["-u", REDIS_URL, "del", ...keys.slice(i, i + 500)]);
      } catch { /* a private Redis goes with the run */ }
    },
  };
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.FAIRGATE_CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

/** A new fan: a browser context of its own (own storage), phone-sized when `phone`. */
export async function newFan(browser, { phone = false } = {}) {
  const context = await browser.newContext(phone
    ? { viewport: { width: 360, height: 740 }, isMobile: true, hasTouch: true }
    : { viewport: { width: 1100, height: 800 } });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  // Refused requests (a declined card, a taken seat) are logged by Chromium as failed loads:
  // those are expected answers; any other console error is a problem.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) problems.push(`console: ${m.text()}`);
  });
  return { context, page, problems };
}

export async function screenshot(page, name) {
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/** Nothing on the page is wider than the viewport (readable at 360 px without sideways scrolling). */
export async function fitsWidth(page) {
  return page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth + 1);
}

/** Fills the seat page's card form with a test card number and pays. */
export async function pay(page, number) {
  await page.getByLabel("Card number").fill(number);
  await page.getByLabel("Expiry").fill("12/34");
  await page.getByLabel("CVC").fill("123");
  await page.getByRole("button", { name: "Pay" }).click();
}

/**
 * Waits until the page's own address is exactly `url`. Our pages take the pass out of the
 * fragment with `history.replaceState` while they load; Playwright's `waitForURL` only looks
 * again on a navigation event and, on a loaded machine, once missed that same-document change,
 * so this asks the document itself (a navigation in between only makes one poll fail).
 */
export async function arriveAt(page, url, timeout = 30_000) {
  const deadline = Date.now() + timeout;
  let seen = page.url();
  while (Date.now() < deadline) {
    try {
      seen = await page.evaluate(() => location.href);
      if (seen === url) return;
    } catch {
      // the document was replaced while we asked; ask the new one
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`the page did not arrive at ${url} in ${timeout} ms (last seen at ${seen})`);
}
