// Two fans race for the same seat: exactly one holds it, the other is told clearly and buys
// another; once both seats are sold the event page says so.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startFairgate, launchBrowser, newFan, screenshot, pay, arriveAt } from "./harness.mjs";

let fg, browser;
before(async () => { fg = await startFairgate(); browser = await launchBrowser(); });
after(async () => { await browser?.close(); await fg?.stop(); });

async function toSeats(fan, event) {
  await fan.page.goto(`${fg.urls.purchase}/e/${event.id}`);
  await fan.page.getByRole("button", { name: "Join the line" }).click();
  await arriveAt(fan.page, `${fg.urls.purchase}/e/${event.id}/seats`);
  await fan.page.locator("#map circle.seat").first().waitFor();
}

test("two fans race for one seat and the loser is told", async () => {
  const event = await fg.createEvent({
    name: "Race night", drawInSecs: 3,
    sections: [{ name: "Front", rows: 1, seats_per_row: 2, price_cents: 9900 }],
  });
  const a = await newFan(browser), b = await newFan(browser, { phone: true });
  await Promise.all([toSeats(a, event), toSeats(b, event)]);

  // Both choose the first seat, then both press "Hold" at the same moment.
  for (const fan of [a, b]) {
    await fan.page.locator("#map circle.seat").first().click();
    await fan.page.locator("#chosen", { hasText: "1 seat(s) chosen." }).waitFor();
  }
  const press = (fan) => fan.page.evaluate(() => { const button = document.getElementById("hold"); if (!button.disabled) button.click(); });
  await Promise.all([press(a), press(b)]);
  const outcome = async (fan) => {
    await fan.page.waitForFunction(() => !document.getElementById("pay").hidden || !document.getElementById("problem").hidden);
    return (await fan.page.locator("#pay").isVisible()) ? "held" : await fan.page.locator("#problem").innerText();
  };
  const [oa, ob] = await Promise.all([outcome(a), outcome(b)]);
  const winner = oa === "held" ? a : b, loser = oa === "held" ? b : a;
  const lost = oa === "held" ? ob : oa;
  assert.ok((oa === "held") !== (ob === "held"), `exactly one fan holds the seat: ${oa} / ${ob}`);
  assert.match(lost, /just taken by someone else|Someone else just took/, "the loser is told the seat was taken");
  await screenshot(loser.page, "race-1-loser-told");
  await screenshot(winner.page, "race-2-winner-holds");

  // The loser sees the seat as taken and buys the other one.
  await loser.page.locator("#map circle.seat.held").first().waitFor();
  await loser.page.locator("#map circle.seat:not(.held):not(.sold)").first().click();
  await loser.page.getByRole("button", { name: "Hold these seats" }).click();
  await loser.page.locator("#pay").waitFor();
  for (const fan of [winner, loser]) {
    await pay(fan.page, "4242424242424242");
    await fan.page.locator("#done", { hasText: "You have your tickets" }).waitFor();
  }
  const report = await fg.api("GET", `${fg.urls.purchase}/api/v1/organizer/events/${event.id}/report`, null, fg.tokens.organizer);
  assert.equal(report.sold, 2);
  assert.equal(report.orders_paid, 2);

  // Sold out is shown as such on the event page.
  const late = await newFan(browser);
  await late.page.goto(`${fg.urls.purchase}/e/${event.id}`);
  await late.page.locator("#sale", { hasText: "Sold out" }).waitFor();
  assert.equal(await late.page.getByRole("button", { name: "Join the line" }).isVisible(), false);
  await screenshot(late.page, "race-3-sold-out");
  for (const fan of [a, b, late]) assert.deepEqual(fan.problems, []);
});
