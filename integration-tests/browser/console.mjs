// What an operator does in the console, in Debian's chromium (headless) driven by
// playwright-core. Run by integration-tests/tests/console.rs, which starts the real gateway
// with a supervised redis-connector and a function that fails until it is fixed, and
// which answers this script's requests on stdin:
//
//   stdout "produce"  -> the test publishes the messages, then writes "produced"
//   stdout "fix"      -> the test fixes the function,   then writes "fixed"
//
// Environment: GATEWAY_URL, CONSOLE_USER, CONSOLE_PASSWORD, FUNCTION, TOPIC, MESSAGES (how
// many the test publishes), MARKUP (one payload that holds markup).
// Exits 0 when every step held; prints what failed otherwise.
import { chromium } from "playwright-core";
import readline from "node:readline";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env("GATEWAY_URL");
const user = env("CONSOLE_USER");
const password = env("CONSOLE_PASSWORD");
const fn = env("FUNCTION");
const topic = env("TOPIC");
const messages = Number(env("MESSAGES"));
const markup = env("MARKUP");
const WITHIN = 30_000;
/// What the page showed last, printed when a step fails.
let lastSeen = "";

const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function ask(what, answer) {
  console.log(what);
  const { value, done } = await lines.next();
  if (done || value.trim() !== answer) throw new Error(`expected "${answer}", got ${value}`);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

/// Polls `probe` until it returns a truthy value, at most WITHIN.
async function eventually(what, probe) {
  const deadline = Date.now() + WITHIN;
  let last;
  while (Date.now() < deadline) {
    last = await probe();
    if (last) return last;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`${what}: not within ${WITHIN} ms (last: ${JSON.stringify(last)}; page: ${lastSeen})`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  // A wrong password gets nothing: not the page, not the API.
  const stranger = await browser.newContext({ httpCredentials: { username: user, password: "wrong" } });
  const denied = await stranger.newPage();
  const refused = await denied.goto(`${url}/ui/`);
  check(refused.status() === 401, `/ui/ with a wrong password: ${refused.status()}`);
  check(!(await denied.content()).includes("Dead letters"), "the console was shown to a wrong password");
  const apiRefused = await denied.request.get(`${url}/ui/api/connectors`);
  check(apiRefused.status() === 401, `/ui/api/connectors with a wrong password: ${apiRefused.status()}`);
  await stranger.close();

  const context = await browser.newContext({ httpCredentials: { username: user, password } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("dialog", (d) => d.accept());
  const opened = await page.goto(`${url}/ui/`);
  check(opened.status() === 200, `/ui/: ${opened.status()}`);

  // The function and its topic.
  const fnRow = page.locator(`#functions tr[data-function="${fn}"]`);
  await fnRow.waitFor({ timeout: WITHIN });
  check((await fnRow.textContent()).includes(topic), `the function's row lacks its topic`);
  // A scheduled function shows its next fire time (from the supervised cron-connector).
  await eventually("the next fire time of a schedule", async () =>
    ((await page.locator('#functions tr[data-function="ticker"]').textContent()) || "")
      .includes("@every 1h (next "));

  // The connector's backlog rises while the function fails.
  await ask("produce", "produced");
  const subscription = page.locator(`#connectors tr[data-function^="${fn}"]`);
  const rose = await eventually("the backlog rises", async () => {
    lastSeen = `${await page.locator("#updated").textContent()} | ${await page.locator("#connectors").textContent()}`;
    // Every connector lists every subscription; the broker connector's backlog rises.
    const cells = await subscription.locator("td.backlog").allTextContents();
    const backlog = Math.max(0, ...cells.map(Number));
    return backlog > 0 ? backlog : false;
  });
  console.log(`backlog seen: ${rose}`);
  // ... and its deliveries wait out their backoffs (3 s each) as retrying.
  const retrying = await eventually("deliveries retrying", async () => {
    const cells = await subscription.locator("td.retrying").allTextContents();
    const n = Math.max(0, ...cells.map(Number));
    return n > 0 ? n : false;
  });
  console.log(`retrying seen: ${retrying}`);
  // The connector's delivery rate arrives as a number (none delivered while it fails).
  await eventually("a delivery rate", async () =>
    (await subscription.locator("td.rate").allTextContents()).some((t) => /^\d+\.\d$/.test(t)));

  // The dead letters, filtered by function and status, once the attempts are spent.
  // The broker connector's dead letters (the cron connector has none).
  const redis = await page
    .locator("#filter select[name=connector] option", { hasText: "redis-connector" })
    .getAttribute("value");
  await page.locator("#filter select[name=connector]").selectOption(redis);
  await page.locator("#filter input[name=function]").fill(fn);
  await page.locator("#filter input[name=status]").fill("5xx");
  await eventually("every message dead-lettered", async () => {
    await page.locator("#search").click();
    await page.waitForTimeout(200);
    return (await page.locator("#letters tr.letter").count()) === messages;
  });
  // A payload holding markup is shown as text: the text is there, no element made of it.
  const cells = await page.locator("#letters td.payload").allTextContents();
  check(cells.some((t) => t.startsWith(markup)), `no payload shown as its text: ${cells}`);
  check((await page.locator("#letters img, #letters script").count()) === 0, "a payload became markup");
  // Another status selects none of them.
  await page.locator("#filter input[name=status]").fill("4xx");
  await page.locator("#search").click();
  await eventually("a 4xx filter selects nothing", async () =>
    (await page.locator("#letters-summary").textContent()).startsWith("0 selected"));
  await page.locator("#filter input[name=status]").fill("5xx");

  // Fixed: replayed through the connector, the list empties.
  await ask("fix", "fixed");
  await page.locator("#replay").click();
  await eventually("the replay's result", async () =>
    (await page.locator("#result").textContent()).includes(`replay: ${messages} replayed, 0 failed`));
  await eventually("no dead letter left", async () => {
    await page.locator("#search").click();
    await page.waitForTimeout(200);
    return (await page.locator("#letters tr.letter").count()) === 0;
  });

  // Deploy a function from the page, invoke it, and remove it, as the OpenFaaS portal does.
  await page.locator("#deploy summary").click();
  await page.locator("#deploy-form input[name=service]").fill("echoer");
  await page.locator("#deploy-form input[name=envProcess]").fill("cat");
  await page.locator("#deploy-form input[name=topic]").fill("echoes");
  await page.locator("#deploy-form button[type=submit]").click();
  const echoer = page.locator('#functions tr[data-function="echoer"]');
  await echoer.waitFor({ timeout: WITHIN });
  check((await echoer.textContent()).includes("echoes"), "the deployed function's topic");
  await echoer.locator("button", { hasText: "invoke" }).click();
  await page.locator("#invoke-body").fill("hello from the console");
  await page.locator("#invoke-send").click();
  await eventually("the invocation's answer", async () => {
    const answer = await page.locator("#invoke-result").textContent();
    return answer.startsWith("200") && answer.includes("hello from the console");
  });
  await echoer.locator("button", { hasText: "remove" }).click();
  await echoer.waitFor({ state: "detached", timeout: WITHIN });

  check(errors.length === 0, `errors on the page: ${errors.join("; ")}`);
  console.log("done");
} finally {
  await browser.close();
}
process.exit(0);
