"""Uploads one file with tuspy (the real PyPI package), as an application would; driven by
tests/tus_clients.rs.

python3 tuspy_upload.py '<json options>'
  endpoint, file, chunkSize, token, metadata (object), uploadUrl (resume this upload),
  checksum (send Upload-Checksum, sha1, with every PATCH).
Prints one JSON line: {"url", "offset"}; exits 1 with the error.
"""

import json
import sys

from tusclient import client

opts = json.loads(sys.argv[1])
tus = client.TusClient(opts["endpoint"], headers={"Authorization": "Bearer " + opts["token"]})
kwargs = {"chunk_size": opts["chunkSize"], "metadata": opts.get("metadata", {}), "retries": 5, "retry_delay": 1}
if opts.get("checksum"):
    kwargs["upload_checksum"] = True
if opts.get("uploadUrl"):
    kwargs["url"] = opts["uploadUrl"]
uploader = tus.uploader(opts["file"], **kwargs)
uploader.upload()
print(json.dumps({"url": uploader.url, "offset": uploader.offset}))
