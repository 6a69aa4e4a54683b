// Headless Chromium drives the sandbox chat page; exits non-zero unless the agent answers.
const { chromium } = require('playwright-core');

async function main() {
const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage();
  await page.goto(url);
  await page.fill('#text', 'Hi! What are your prices?');
  await page.click('#send');
  await page.waitForSelector('.msg.user', { timeout: 10000 });
  const reply = await page.waitForSelector('.msg.agent', { timeout: 30000 });
  const text = await reply.textContent();
  await page.screenshot({ path: screenshot });
  if (!/order/i.test(text)) {
    throw new Error(`unexpected agent reply: ${text}`);
  }
  console.log(`chat page: the agent answered "${text}" (screenshot: ${screenshot})`);
} finally {
  await browser.close();
}
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
