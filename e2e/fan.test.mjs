// A fan's whole journey on a phone-sized screen: event page → join → waiting page with the
// countdown to the draw → the draw → the seat page → hold → pay → tickets; then the fan checks
// the join receipt against the published draw in the browser.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startFairgate, launchBrowser, newFan, screenshot, fitsWidth, pay, arriveAt } from "./harness.mjs";

let fg, browser;
before(async () => { fg = await startFairgate(); browser = await launchBrowser(); });
after(async () => { await browser?.close(); await fg?.stop(); });

test("a fan joins before the draw, is admitted and buys a seat", async () => {
  const event = await fg.createEvent({ name: "Phone fan night", drawInSecs: 8 });
  const { page, problems } = await newFan(browser, { phone: true });

  await page.goto(`${fg.urls.purchase}/e/${event.id}`);
  await page.getByRole("heading", { name: "Phone fan night" }).waitFor();
  await page.locator("#sale", { hasText: "The sale starts in" }).waitFor();
  assert.equal(await page.locator("#tiers tr").count(), 1, "one price tier listed");
  assert.match(await page.locator("#tiers").innerText(), /Stalls[\s\S]*12 of 12/);
  assert.ok(await fitsWidth(page), "the event page fits 360 px");
  await screenshot(page, "fan-1-event-page");

  await page.getByRole("button", { name: "Join the line" }).click();
  await arriveAt(page, `${fg.urls.queue}/e/${event.id}`);
  await page.locator("#phase", { hasText: "The draw is in" }).waitFor();
  await page.getByRole("heading", { name: /Phone fan night/ }).waitFor();
  assert.ok(!page.url().includes("#"), "ticket and receipt are taken out of the address bar");
  const receiptLink = page.getByRole("link", { name: /Check your join receipt/ });
  const receiptHref = await receiptLink.getAttribute("href");
  assert.ok(receiptHref.startsWith(`${fg.urls.buffer}/e/${event.id}/receipt#receipt=`), receiptHref);
  assert.ok(await fitsWidth(page), "the waiting page fits 360 px");
  await screenshot(page, "fan-2-waiting-for-the-draw");

  await page.locator("#turn", { hasText: "It is your turn" }).waitFor({ timeout: 30_000 });
  await screenshot(page, "fan-3-your-turn");
  await arriveAt(page, `${fg.urls.purchase}/e/${event.id}/seats`, 10_000);
  await page.locator("#map circle.seat").first().waitFor();
  assert.ok(!page.url().includes("#"), "the pass is taken out of the address bar");
  assert.ok(await fitsWidth(page), "the seat page fits 360 px");
  await screenshot(page, "fan-4-seat-map");

  // Keyboard: focus a seat and choose it with Enter.
  await page.locator("#map circle.seat").nth(2).focus();
  await page.keyboard.press("Enter");
  await page.locator("#chosen", { hasText: "1 seat(s) chosen." }).waitFor();
  await page.getByRole("button", { name: "Hold these seats" }).click();
  await page.locator("#pay").waitFor();
  assert.match(await page.locator("#countdown").innerText(), /^[45]:\d\d$/);
  await screenshot(page, "fan-5-held");

  // A mistyped number is caught on the page; a declined card gets a clear error and the hold
  // stays; then a card that pays.
  await pay(page, "4242 4242 4242 4241");
  await page.locator("#problem", { hasText: "card number is not valid" }).waitFor();
  await pay(page, "4000 0000 0000 0002");
  await page.locator("#problem", { hasText: "Payment refused" }).waitFor();
  await screenshot(page, "fan-6-declined");
  await pay(page, "4242 4242 4242 4242");
  await page.locator("#done", { hasText: "You have your tickets" }).waitFor();
  assert.equal(await page.locator("#tickets li").count(), 1);
  await screenshot(page, "fan-7-tickets");

  const report = await fg.api("GET", `${fg.urls.purchase}/api/v1/organizer/events/${event.id}/report`, null, fg.tokens.organizer);
  assert.equal(report.sold, 1, "one seat sold");
  assert.equal(report.orders_paid, 1, "one paid order");

  // The receipt, checked in the browser against the published keys and draw.
  await page.goto(receiptHref);
  await page.locator("#summary", { hasText: "Your draw place: 1" }).waitFor({ timeout: 15_000 });
  assert.equal(await page.locator("#checks li.fail").count(), 0, await page.locator("#checks").innerText());
  assert.equal(await page.locator("#checks li.pass").count(), 7, await page.locator("#checks").innerText());
  await screenshot(page, "fan-8-receipt-checked");

  // An edited receipt is refused.
  const forged = decodeURIComponent(receiptHref.split("#receipt=")[1]).replace(/~(.)/, (_, c) => "~" + (c === "A" ? "B" : "A"));
  await page.locator("#receipt").fill(forged);
  await page.getByRole("button", { name: "Check" }).click();
  await page.locator("#checks li.fail").first().waitFor();
  await screenshot(page, "fan-9-forged-receipt-refused");

  assert.deepEqual(problems, []);
});
