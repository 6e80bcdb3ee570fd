// An organizer creates an event with the seat-map generator, changes its sale window (on the
// buffer service, across origins) and reads the sales report.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startFairgate, launchBrowser, newFan, screenshot } from "./harness.mjs";

let fg, browser;
before(async () => { fg = await startFairgate(); browser = await launchBrowser(); });
after(async () => { await browser?.close(); await fg?.stop(); });

test("an organizer creates an event, sets its sale window and sees the report", async () => {
  const { page, problems } = await newFan(browser);
  await page.goto(`${fg.urls.purchase}/organizer`);
  await page.getByLabel("Organizer token").fill(fg.tokens.organizer);
  await page.getByRole("button", { name: "Sign in" }).click();
  assert.equal(await page.locator("#login").isVisible(), false, "the sign-in form is gone");
  await page.getByLabel("Name").fill("Generated hall");
  await page.getByLabel("Venue").fill("Salle Rameau");
  // The generator starts with two sections (10 × 20 and 6 × 16); one more, and a standing area.
  await page.getByRole("button", { name: "Add a section" }).click();
  const third = page.locator("#sections > div").nth(2);
  await third.getByLabel("Rows").fill("3");
  await third.getByLabel("Seats per row").fill("4");
  await page.getByRole("button", { name: "Add a standing area" }).click();
  await page.locator("#map-total", { hasText: "308 seats in 3 sections and 100 standing places." }).waitFor();
  await screenshot(page, "organizer-1-generator");

  await page.getByRole("button", { name: "Create the event" }).click();
  await page.locator("#done", { hasText: "places." }).waitFor();
  assert.match(await page.locator("#done").innerText(), /Created event (\d+): 408 places\./);
  const id = Number((await page.locator("#done").innerText()).match(/Created event (\d+)/)[1]);
  const created = await fg.api("GET", `${fg.urls.purchase}/api/v1/events/${id}`);
  assert.equal(created.name, "Generated hall");
  assert.equal(created.seats_total, 408);
  assert.deepEqual(created.tiers.map((t) => [t.name, t.total]), [["Stalls", 200], ["Balcony", 96], ["Section 3", 12], ["Standing", 100]]);

  // The sale window lives on the buffer service: read and saved from this page across origins.
  await page.getByLabel("Admissions per minute").nth(1).waitFor();
  const rate = page.locator("#w-rate_per_minute");
  assert.equal(await rate.inputValue(), "600");
  await rate.fill("1200");
  await page.getByRole("button", { name: "Save the sale window" }).click();
  await page.locator("#done", { hasText: "Sale window saved." }).waitFor();
  const window = await fg.api("GET", `${fg.urls.buffer}/api/v1/organizer/events/${id}/sale`, null, fg.tokens.organizer);
  assert.equal(window.rate_per_minute, 1200);

  // A window that makes no sense is refused with the field named, and nothing changes.
  await page.locator("#w-seats_per_fan").fill("0");
  await page.locator("#w-seats_per_fan").evaluate((input) => { input.min = ""; });
  await page.getByRole("button", { name: "Save the sale window" }).click();
  await page.locator("#problem", { hasText: "seats_per_fan" }).waitFor();
  const unchanged = await fg.api("GET", `${fg.urls.buffer}/api/v1/organizer/events/${id}/sale`, null, fg.tokens.organizer);
  assert.equal(unchanged.seats_per_fan, 4);

  await page.locator("#r-cards", { hasText: "0 / 408" }).waitFor();
  assert.equal(await page.locator("#r-tiers tr").count(), 4);
  await screenshot(page, "organizer-2-event-and-report");
  assert.deepEqual(problems, []);
});
