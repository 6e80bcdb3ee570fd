// An operator pauses the line from the dashboard and a waiting fan sees it at once; the
// projected drain time is shown before a change is applied; a broadcast message reaches the fan.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startFairgate, launchBrowser, newFan, screenshot, fitsWidth, arriveAt } from "./harness.mjs";

let fg, browser;
before(async () => { fg = await startFairgate(); browser = await launchBrowser(); });
after(async () => { await browser?.close(); await fg?.stop(); });

test("an operator pauses the line and a waiting fan sees it", async () => {
  // One shopper at a time: a first fan (joined before the draw, never claiming) holds the only
  // slot, so the browser fan, joining after the draw, waits in line.
  const event = await fg.createEvent({ name: "Paused night", drawInSecs: 2, maxActive: 1 });
  await fg.api("POST", `${fg.urls.buffer}/api/v1/events/${event.id}/join`, {});
  for (let i = 0; i < 100; i++) {
    const draw = await fg.api("GET", `${fg.urls.buffer}/api/v1/events/${event.id}/draw?limit=1`);
    if (draw.status === "drawn") break;
    await new Promise((r) => setTimeout(r, 200));
  }
  const fan = await newFan(browser, { phone: true });
  await fan.page.goto(`${fg.urls.purchase}/e/${event.id}`);
  await fan.page.getByRole("button", { name: "Join the line" }).click();
  await arriveAt(fan.page, `${fg.urls.queue}/e/${event.id}`);
  await fan.page.locator("#position", { hasText: "2" }).waitFor();
  await fan.page.locator("#phase", { hasText: "The line is moving" }).waitFor();
  await screenshot(fan.page, "operator-1-fan-waiting");

  const ops = await newFan(browser);
  await ops.page.goto(`${fg.urls.queue}/operator/e/${event.id}`);
  await ops.page.getByLabel("Operator token").fill("not-the-token");
  await ops.page.getByRole("button", { name: "Sign in" }).click();
  await ops.page.locator("#problem", { hasText: "not accepted" }).waitFor();
  await ops.page.getByLabel("Operator token").fill(fg.tokens.operator);
  await ops.page.getByRole("button", { name: "Sign in" }).click();
  await ops.page.locator("#v-waiting", { hasText: "1" }).waitFor();
  await ops.page.locator("#title", { hasText: "Paused night" }).waitFor();
  assert.equal(await ops.page.locator("#login").isVisible(), false, "the sign-in form is gone");
  await ops.page.locator("#chart-line svg").waitFor();

  // The projection follows what is typed, before anything is applied.
  await ops.page.getByLabel("Admissions per minute").fill("1");
  await ops.page.locator("#projection", { hasText: "At 1 per minute the 1 fan waiting is admitted in 1 min" }).waitFor();
  const before = await fg.api("GET", `${fg.urls.queue}/api/v1/operator/events/${event.id}/stats`, null, fg.tokens.operator);
  assert.equal(before.rate_per_minute, 600, "typing changes nothing until applied");
  await screenshot(ops.page, "operator-2-dashboard-projection");

  await ops.page.getByRole("button", { name: "Pause the line" }).click();
  await ops.page.locator("#done", { hasText: "The line is paused" }).waitFor();
  await fan.page.locator("#phase", { hasText: "The line is paused by the organizers" }).waitFor({ timeout: 5_000 });
  await fan.page.locator("#eta", { hasText: "unknown while the line is paused" }).waitFor();
  assert.ok(await fitsWidth(fan.page));
  await screenshot(fan.page, "operator-3-fan-sees-pause");

  await ops.page.getByLabel("Message to every waiting fan").fill("Back in five minutes: your place is safe.");
  await ops.page.getByRole("button", { name: "Send" }).click();
  await fan.page.locator("#message", { hasText: "Back in five minutes" }).waitFor({ timeout: 5_000 });
  await screenshot(ops.page, "operator-4-dashboard-paused");

  const paused = await fg.api("GET", `${fg.urls.queue}/api/v1/operator/events/${event.id}/stats`, null, fg.tokens.operator);
  assert.equal(paused.paused, true);
  assert.equal(paused.message, "Back in five minutes: your place is safe.");

  await ops.page.getByRole("button", { name: "Resume the line" }).click();
  await fan.page.locator("#phase", { hasText: "The line is moving" }).waitFor({ timeout: 5_000 });

  // A new rate and cap, applied from the dashboard, reach the waiting fan's page too.
  await ops.page.getByLabel("Admissions per minute").fill("120");
  await ops.page.getByLabel("Most active shoppers").fill("1");
  await ops.page.getByRole("button", { name: "Apply rate and cap" }).click();
  await ops.page.locator("#done", { hasText: "Now admitting 120 per minute" }).waitFor();
  await fan.page.locator("#phase", { hasText: "120 fans per minute" }).waitFor({ timeout: 5_000 });
  const applied = await fg.api("GET", `${fg.urls.queue}/api/v1/operator/events/${event.id}/stats`, null, fg.tokens.operator);
  assert.equal(applied.rate_per_minute, 120);
  assert.equal(applied.max_active, 1);
  assert.deepEqual(fan.problems, []);
  assert.deepEqual(ops.problems, []);
});
