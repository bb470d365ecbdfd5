// Uploads one file with tus-js-client (the real npm package, run by Node), as an
// application would; driven by tests/tus_clients.rs.
//
// node tus_upload.mjs '<json options>'
//   endpoint, file, chunkSize, protocol ('tus-v1' | 'ietf-draft-03' | 'ietf-draft-05'),
//   token, metadata (object), uploadUrl (resume this upload),
//   parallelUploads (split into that many partial uploads, joined by concatenation),
//   pauseAt (bytes: before the first PATCH at or past this offset, print PAUSED <url>
//   and wait pauseMs, so the test can kill and restart the gateway meanwhile).
// Prints one JSON line: {"url", "bytesUploaded"} on success; exits 1 with the error.
import { readFileSync } from 'node:fs'
import * as tus from 'tus-js-client'

const opts = JSON.parse(process.argv[2])
const data = readFileSync(opts.file)
let paused = false
let url = opts.uploadUrl ?? null

const upload = new tus.Upload(data, {
  endpoint: opts.endpoint,
  uploadUrl: opts.uploadUrl,
  chunkSize: opts.chunkSize,
  parallelUploads: opts.parallelUploads ?? 1,
  protocol: opts.protocol ?? 'tus-v1',
  headers: { Authorization: `Bearer ${opts.token}` },
  metadata: opts.metadata ?? {},
  retryDelays: [200, 500, 1000, 2000, 3000, 5000, 8000],
  storeFingerprintForResuming: false,
  removeFingerprintOnSuccess: false,
  onUploadUrlAvailable() {
    url = upload.url
  },
  async onBeforeRequest(req) {
    if (opts.pauseAt === undefined || paused || req.getMethod() !== 'PATCH') return
    const offset = Number(req.getHeader('Upload-Offset'))
    if (offset >= opts.pauseAt) {
      paused = true
      process.stdout.write(`PAUSED ${upload.url} ${offset}\n`)
      await new Promise((resolve) => setTimeout(resolve, opts.pauseMs ?? 3000))
    }
  },
  onError(err) {
    process.stderr.write(`tus-js-client failed: ${err}\n`)
    process.exit(1)
  },
  onSuccess() {
    // With parallel uploads, the final upload's URL.
    url = upload.url ?? url
    process.stdout.write(`${JSON.stringify({ url, bytesUploaded: data.length })}\n`)
  },
})
upload.start()
