// Headless Chromium drives both sides of the sandbox, as two people would: the customer on the
// chat page and a team member in the team inbox. Exits non-zero unless every step happens:
//   1. the customer asks about prices and the agent answers;
//   2. the customer types "human": the agent hands off and says a person will reply;
//   3. the team member logs in to the inbox, sees the conversation arrive, and replies;
//   4. the customer sees the human's reply, then a template the member picks and fills in;
//      the customer sends a photo and the member sees it in the transcript;
//   5. the team member resumes the agent, and the agent answers the customer again.
const { chromium } = require('playwright-core');

async function main() {
const [chatUrl, inboxUrl, token, screenshotDir] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const step = (s) => console.log(`chat page: ${s}`);
try {
  const customer = await browser.newPage();
  await customer.goto(chatUrl);
  const agentBubbles = () => customer.locator('.msg.agent');
  const say = async (text) => {
    await customer.fill('#text', text);
    await customer.click('#send');
  };
  const waitForBubble = async (pattern, what) => {
    await customer.waitForFunction(
      ([source, flags]) => [...document.querySelectorAll('.msg.agent')].some((e) => new RegExp(source, flags).test(e.textContent)),
      [pattern.source, pattern.flags], { timeout: 30000 },
    ).catch(() => { throw new Error(`the customer never saw ${what}`); });
  };

  await say('Hi! What are your prices?');
  await customer.waitForSelector('.msg.user', { timeout: 10000 });
  await waitForBubble(/order/i, 'the agent answer the price question');
  step('the agent answered the price question');

  await say('I want to talk to a human');
  await waitForBubble(/member of our team/i, 'the handoff message');
  step('the agent handed off');

  const team = await browser.newPage();
  await team.goto(inboxUrl);
  await team.fill('#token', token);
  await team.click('#login');
  await team.waitForSelector('#app:not([hidden])', { timeout: 10000 });
  // A locator, not an element handle: live updates re-render the list, and a locator
  // re-resolves the element at click time.
  await team.locator('.conv').first().click({ timeout: 15000 });
  await team.waitForFunction(
    () => [...document.querySelectorAll('#transcript .msg.customer')].some((e) => /talk to a human/.test(e.textContent)),
    null, { timeout: 10000 },
  );
  step('the team member sees the conversation in the inbox');
  await team.fill('#reply', 'Hello, this is Alice from the team. How can I help?');
  await team.click('#send');
  await team.waitForSelector('#transcript .msg.human', { timeout: 10000 });
  await waitForBubble(/this is Alice/, "the human's reply");
  step("the customer received the human's reply");
  // 4b. a template from the picker (listed from the fake Graph API by the gateway), parameters
  //     filled in; the customer's phone shows it rendered.
  await team.waitForFunction(
    () => [...document.querySelectorAll('#template option')].some((o) => /order_update/.test(o.textContent) && !o.disabled),
    null, { timeout: 20000 },
  ).catch(() => { throw new Error('the inbox never offered the approved template'); });
  await team.selectOption('#template', { label: 'order_update (en_US)' });
  await team.fill('#template-params input >> nth=0', 'Ana');
  await team.fill('#template-params input >> nth=1', '#1234');
  await team.waitForFunction(() => /Ana #1234/.test(document.querySelector('#template-preview').textContent),
    null, { timeout: 5000 });
  await team.click('#send-template');
  await waitForBubble(/order_update: Ana #1234/, 'the template the team member sent');
  step('the team member sent a template from the picker and the customer received it');
  // 4c. the customer sends a photo; the gateway fetches it after the webhook and the team member
  //     sees it in the transcript (fetched with the token, decoded by the browser).
  const png = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==', 'base64');
  await customer.fill('#text', 'the box arrived like this');
  await customer.setInputFiles('#photo', { name: 'box.png', mimeType: 'image/png', buffer: png });
  await team.waitForFunction(
    () => [...document.querySelectorAll('#transcript .msg.customer .media img')].some((i) => i.complete && i.naturalWidth === 1),
    null, { timeout: 30000 },
  ).catch(async () => { await team.screenshot({ path: `${screenshotDir}/team-inbox-photo.png` }); throw new Error('the team member never saw the photo'); });
  step('the customer sent a photo and the team member sees it in the transcript');
  await team.setInputFiles('#attach', { name: 'invoice.pdf', mimeType: 'application/pdf', buffer: Buffer.from('%PDF-1.4 invoice') });
  await waitForBubble(/\[document: invoice\.pdf\]/, 'the file the team member sent');
  step('the team member sent a file and the customer received it');
  await customer.screenshot({ path: `${screenshotDir}/chat-page.png` });
  await team.screenshot({ path: `${screenshotDir}/team-inbox.png` });

  await team.click('#resume');
  await team.waitForFunction(() => document.querySelectorAll('.conv').length === 0, null, { timeout: 10000 });
  step('the team member resumed the agent');
  const before = await agentBubbles().count();
  await say('What are your prices again?');
  await customer.waitForFunction(
    (n) => document.querySelectorAll('.msg.agent').length > n, before, { timeout: 30000 },
  ).catch(() => { throw new Error('the agent did not answer after resume'); });
  const last = await agentBubbles().last().textContent();
  if (!/order/i.test(last)) {
    throw new Error(`unexpected agent reply after resume: ${last}`);
  }
  step(`the agent answers again: "${last}" (screenshots in ${screenshotDir})`);
} finally {
  await browser.close();
}
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
