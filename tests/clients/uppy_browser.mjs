// Drives the browser example (examples/browser) in Debian's headless chromium, for
// tests/browser.rs: opens the page with one plugin, adds files through the Dashboard's
// file input, uploads, and prints one JSON line with Uppy's outcome.
//
//   node uppy_browser.mjs <pageUrl> <tus|s3> <mode> <screenshot.png> <file>...
//   mode: upload       upload the files, wait for Uppy's `complete`
//         remove       start uploading, remove the file once its first part is in S3
//         reload       start uploading, pause and reload the page once the first part is in
//                      S3, let Golden Retriever restore the file, resume, wait for `complete`
import puppeteer from 'puppeteer-core'

const [pageUrl, plugin, mode, screenshot, ...files] = process.argv.slice(2)
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
})
const out = { plugin, mode }
try {
  const page = await browser.newPage()
  page.on('console', (m) => process.stderr.write(`[page] ${m.type()}: ${m.text()}\n`))
  page.on('pageerror', (e) => process.stderr.write(`[page] error: ${e}\n`))
  page.on('response', (r) => {
    if (r.status() >= 400) process.stderr.write(`[page] ${r.request().method()} ${r.url()} -> ${r.status()}\n`)
  })
  await page.goto(`${pageUrl}/?plugin=${plugin}`, { waitUntil: 'load' })
  await page.waitForFunction(() => window.upgateUppy !== undefined, { timeout: 30000 })
  out.sessionId = await page.evaluate(() => window.upgateConfig.sessionId)
  const input = await page.waitForSelector('.uppy-Dashboard-input', { timeout: 30000 })
  await input.uploadFile(...files)
  await page.waitForFunction((n) => window.upgateUppy.getFiles().length === n, {}, files.length)

  // Resolves once the first part of a multipart upload is in S3.
  const firstPart = () => page.evaluate(() => new Promise((resolve) => {
    window.upgateUppy.once('s3-multipart:part-uploaded', () => resolve(true))
  }))

  if (mode === 'upload') {
    await page.click('.uppy-StatusBar-actionBtn--upload')
    await page.waitForFunction(() => window.upgateResult !== undefined, { timeout: 120000 })
    out.result = await page.evaluate(() => window.upgateResult)
  } else if (mode === 'remove') {
    const part = firstPart()
    await page.click('.uppy-StatusBar-actionBtn--upload')
    await part
    // Uppy sends its abort without waiting for it: the test waits for the gateway's answer.
    const aborted = page.waitForResponse((r) => r.request().method() === 'DELETE' &&
      r.url().includes('/s3/multipart/'), { timeout: 30000 })
    await page.evaluate(() => {
      const uppy = window.upgateUppy
      for (const f of uppy.getFiles()) uppy.removeFile(f.id)
    })
    out.remaining = await page.evaluate(() => window.upgateUppy.getFiles().length)
    out.abortStatus = (await aborted).status()
  } else if (mode === 'reload') {
    // The upload is paused once its first part is in S3, then the page is reloaded: as if
    // the tab had been closed mid-upload.
    const paused = page.evaluate(() => new Promise((resolve) => {
      window.upgateUppy.once('s3-multipart:part-uploaded', () => {
        window.upgateUppy.pauseAll()
        resolve(true)
      })
    }))
    await page.click('.uppy-StatusBar-actionBtn--upload')
    await paused
    out.beforeReload = await page.evaluate(() =>
      window.upgateUppy.getFiles().map((f) => f.s3Multipart ?? null))
    // Golden Retriever writes its state throttled; a moment for the writes.
    await new Promise((r) => setTimeout(r, 2000))
    await page.reload({ waitUntil: 'load' })
    await page.waitForFunction(() => window.upgateUppy !== undefined, { timeout: 30000 })
    await page.waitForFunction((n) => window.upgateUppy.getFiles().length === n &&
      window.upgateUppy.getFiles().every((f) => !f.isGhost), { timeout: 30000 }, files.length)
    out.restored = await page.evaluate(() =>
      window.upgateUppy.getFiles().map((f) => ({ name: f.name, s3Multipart: f.s3Multipart ?? null })))
    // The Dashboard's resume button (in the restored state) confirms the restore.
    await page.click('.uppy-StatusBar-actionBtn--upload')
    await page.waitForFunction(() => window.upgateResult !== undefined, { timeout: 120000 })
    out.result = await page.evaluate(() => window.upgateResult)
  } else {
    throw new Error(`unknown mode ${mode}`)
  }
  await page.screenshot({ path: screenshot, fullPage: true })
  out.screenshot = screenshot
} catch (e) {
  out.error = String(e && e.stack ? e.stack : e)
} finally {
  await browser.close()
}
console.log(JSON.stringify(out))
