// Uppy's Dashboard uploading through upgate: the example backend (server.rs) creates a
// session with the tenant's API key and hands this page the session's upload token; the
// page never sees the key.
//   ?plugin=tus  @uppy/tus against /v1/tus (the token as a Bearer header)
//   ?plugin=s3   @uppy/aws-s3 against /v1/uppy/<token> (Companion's S3 routes): parts and
//                small files go straight to S3 with URLs and policies the gateway signs
import { Uppy, Dashboard, Tus, AwsS3, GoldenRetriever } from '/uppy/uppy.min.mjs'

const MiB = 1024 * 1024
const plugin = new URLSearchParams(location.search).get('plugin') === 'tus' ? 'tus' : 's3'
document.getElementById(`use-${plugin}`).classList.add('active')

// The session (and its token) is kept across reloads, so that Golden Retriever's restored
// uploads find their session again; a new one is asked for once it has expired.
async function sessionConfig() {
  const kept = JSON.parse(localStorage.getItem('upgate-example-session') ?? 'null')
  if (kept && Date.parse(kept.uploadTokenExpiresAt) > Date.now() + 60000) return kept
  const fresh = await (await fetch('/config')).json()
  localStorage.setItem('upgate-example-session', JSON.stringify(fresh))
  return fresh
}
const config = await sessionConfig()
document.getElementById('session').textContent =
  `session ${config.sessionId} on ${config.gateway}`

const uppy = new Uppy({ id: `upgate-${plugin}`, autoProceed: false })
  .use(Dashboard, { inline: true, target: '#dashboard', proudlyDisplayPoweredByUppy: false })

if (plugin === 'tus') {
  uppy.use(Tus, {
    endpoint: `${config.gateway}/v1/tus`,
    headers: { Authorization: `Bearer ${config.uploadToken}` },
    chunkSize: 5 * MiB,
  })
} else {
  uppy.use(AwsS3, {
    companionEndpoint: `${config.gateway}/v1/uppy/${config.uploadToken}`,
    // Files over one part go multipart (5 MiB parts, upgate's default part size); smaller
    // ones are one form POST.
    shouldUseMultipart: (file) => file.size > 5 * MiB,
  })
  // Resumes an interrupted multipart upload after a reload (its uploadId and key are kept
  // in the browser; the parts already in S3 are listed and skipped).
  // Blobs up to 64 MiB are kept in IndexedDB (Uppy's default: 10 MiB).
  uppy.use(GoldenRetriever, { indexedDB: { maxFileSize: 64 * MiB } })
}

// For the browser test (tests/browser.rs): the outcome of the last upload.
uppy.on('complete', (result) => {
  window.upgateResult = {
    successful: result.successful.map((f) => ({ name: f.name, size: f.size, uploadURL: f.uploadURL ?? null })),
    failed: result.failed.map((f) => ({ name: f.name, error: String(f.error) })),
  }
})
window.upgateUppy = uppy
window.upgateConfig = config
