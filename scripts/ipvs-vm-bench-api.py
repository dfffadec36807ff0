#!/usr/bin/env python3
"""The API server side of the IPVS VM benchmark (scripts/ipvs-vm-bench.sh,
KWP_IPVS_VM_NET=1): etcd and kube-apiserver on the host's loopback, which
the guest reaches as 10.0.2.2 (QEMU user networking maps that address to
the host's 127.0.0.1), and a small control server for the guest.

- A throwaway CA and a serving certificate whose SANs hold 127.0.0.1 and
  10.0.2.2, so the proxies in the guest verify the server as usual.
- A kubeconfig for the guest (server https://10.0.2.2:PORT, an admin token).
- Namespace `bench` and Node `node-1` (InternalIP 10.0.2.15, the guest's).
- The control server on 127.0.0.1 (10.0.2.2 from the guest), HTTP/1.0:
    POST /grow?n=N         creates Services s0..s(N-1) and their
                           EndpointSlices (those not yet there); answers
                           when every write returned
    POST /shift?s=S&ip=IP  points Service S's first endpoint at IP (one
                           JSON patch of its EndpointSlice); answers when
                           the API server did
  The objects are those of host/benches/shared/sync_objects.rs (5 endpoints
  each, port 80 -> 8080), with ClusterIP cluster_ip(s + 256): the API
  server gives 10.96.0.1 to `default/kubernetes`, and 10.96.0.0 is its
  range's network address.

Usage: ipvs-vm-bench-api.py ETCD KUBE_APISERVER WORKDIR
Prints `READY API_PORT CONTROL_PORT KUBECONFIG` once serving; stops both
servers on SIGTERM or when its parent is gone.
"""

import base64
import http.client
import http.server
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

ENDPOINTS = 5
PORT = 80
TARGET_PORT = 8080
# See the module comment: the first bench ClusterIP is cluster_ip(256).
IP_OFFSET = 256
GUEST_HOST = "10.0.2.2"
GUEST_NODE_IP = "10.0.2.15"
NODE = "node-1"
NS = "bench"


def cluster_ip(s):
    s += IP_OFFSET
    return f"10.{96 + s // 65536}.{s // 256 % 256}.{s % 256}"


def endpoint_ip(s, e, shift):
    """As sync_objects.rs: endpoint e of Service s, moved `shift` times."""
    idx = s * ENDPOINTS + e + shift * 1_000_000
    return f"172.{16 + (idx // 65536) % 16}.{idx // 256 % 256}.{idx % 256}"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(d):
    p = lambda n: os.path.join(d, n)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p("ca.key"),
            "-out", p("ca.crt"), "-days", "2", "-subj", "/CN=kwp-ipvs-vm-bench-ca")
    with open(p("serving.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                f"subjectAltName=IP:127.0.0.1,IP:{GUEST_HOST},DNS:localhost,DNS:kubernetes\n")
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", p("serving.key"),
            "-out", p("serving.csr"), "-subj", "/CN=kube-apiserver")
    openssl("x509", "-req", "-in", p("serving.csr"), "-CA", p("ca.crt"), "-CAkey", p("ca.key"),
            "-CAcreateserial", "-days", "2", "-out", p("serving.crt"), "-extfile", p("serving.ext"))
    openssl("genrsa", "-out", p("sa.key"), "2048")
    openssl("rsa", "-in", p("sa.key"), "-pubout", "-out", p("sa.pub"))


class Api:
    """An admin client: one keep-alive connection per thread."""

    def __init__(self, port, ca, token):
        self.port, self.token = port, token
        self.ctx = ssl.create_default_context(cafile=ca)
        self.local = threading.local()

    def request(self, method, path, body=None, content_type="application/json"):
        for attempt in range(3):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx,
                                                   timeout=120)
                self.local.conn = conn
            headers = {"Authorization": f"Bearer {self.token}", "Content-Type": content_type}
            try:
                data = None if body is None else json.dumps(body).encode()
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                text = resp.read().decode(errors="replace")
                return resp.status, text
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.5)

    def must(self, method, path, body=None, ok=(200, 201), **kw):
        status, text = self.request(method, path, body, **kw)
        if status not in ok:
            raise RuntimeError(f"{method} {path}: {status} {text[:500]}")
        return text


def service(s):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"s{s}", "namespace": NS},
            "spec": {"clusterIP": cluster_ip(s),
                     "ports": [{"name": "http", "port": PORT, "targetPort": TARGET_PORT}]}}


def endpoint_slice(s):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"s{s}-1", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": f"s{s}"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [endpoint_ip(s, e, 0)], "conditions": {"ready": True}}
                          for e in range(ENDPOINTS)]}


class Bench:
    def __init__(self, api):
        self.api, self.have, self.lock = api, 0, threading.Lock()

    def create(self, s):
        # 409: there from an earlier, interrupted grow.
        self.api.must("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
                      endpoint_slice(s), ok=(201, 409))
        self.api.must("POST", f"/api/v1/namespaces/{NS}/services", service(s), ok=(201, 409))

    def grow(self, n):
        with self.lock:
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(self.create, range(self.have, n)))
            made, self.have = n - self.have, max(self.have, n)
            return f"created {made} Services and EndpointSlices in {time.monotonic() - started:.1f} s"

    def shift(self, s, ip):
        patch = [{"op": "replace", "path": "/endpoints/0/addresses/0", "value": ip}]
        self.api.must("PATCH", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/s{s}-1",
                      patch, content_type="application/json-patch+json")
        return "patched"


def control_handler(bench):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            url = urllib.parse.urlparse(self.path)
            q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
            try:
                if url.path == "/grow":
                    text, code = bench.grow(int(q["n"])), 200
                elif url.path == "/shift":
                    text, code = bench.shift(int(q["s"]), q["ip"]), 200
                else:
                    text, code = f"unknown {url.path}", 404
            except Exception as e:  # the guest prints what failed
                text, code = f"{type(e).__name__}: {e}", 500
            body = text.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            print(f"api: {url.path} {q}: {code} {text}", file=sys.stderr, flush=True)

        def log_message(self, *args):
            pass

    return Handler


def main():
    etcd_bin, apiserver_bin, work = sys.argv[1:4]
    os.makedirs(work, exist_ok=True)
    make_pki(work)
    token = secrets.token_hex(16)
    with open(os.path.join(work, "tokens.csv"), "w") as f:
        f.write(f'{token},admin,admin-uid,"system:masters"\n')
    client, peer, api_port = free_port(), free_port(), free_port()
    etcd_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    logs = []

    def spawn(name, args):
        log = open(os.path.join(work, f"{name}.log"), "w")
        logs.append(log)
        return subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    p = lambda n: os.path.join(work, n)
    procs = [spawn("etcd", [etcd_bin, "--name", "kwp-bench", "--log-level", "warn",
                            "--data-dir", p("etcd"), "--listen-client-urls", etcd_url,
                            "--advertise-client-urls", etcd_url, "--listen-peer-urls", peer_url,
                            "--initial-advertise-peer-urls", peer_url,
                            f"--initial-cluster=kwp-bench={peer_url}"])]

    def stop(*_):
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    time.sleep(2)
    procs.append(spawn("kube-apiserver", [
        apiserver_bin, f"--etcd-servers={etcd_url}", f"--secure-port={api_port}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
        f"--tls-cert-file={p('serving.crt')}", f"--tls-private-key-file={p('serving.key')}",
        f"--client-ca-file={p('ca.crt')}", f"--token-auth-file={p('tokens.csv')}",
        f"--cert-dir={p('certs')}", "--authorization-mode=RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={p('sa.pub')}",
        f"--service-account-signing-key-file={p('sa.key')}",
        # A /12: 10k Services and more fit.
        "--service-cluster-ip-range=10.96.0.0/12",
        # The `kubernetes` Service's endpoint would be 127.0.0.1, which an
        # EndpointSlice may not hold.
        "--endpoint-reconciler-type=none", "--profiling=false"]))
    api = Api(api_port, p("ca.crt"), token)
    deadline = time.monotonic() + 180
    while True:
        try:
            if api.request("GET", "/readyz")[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline or any(proc.poll() is not None for proc in procs):
            print(open(p("kube-apiserver.log")).read()[-3000:], file=sys.stderr)
            stop()
        time.sleep(0.5)
    api.must("POST", "/api/v1/namespaces", {"metadata": {"name": NS}}, ok=(201, 409))
    api.must("POST", "/api/v1/nodes", {
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        "status": {"addresses": [{"type": "InternalIP", "address": GUEST_NODE_IP},
                                 {"type": "Hostname", "address": NODE}]}}, ok=(201, 409))
    ca = base64.b64encode(open(p("ca.crt"), "rb").read()).decode()
    kubeconfig = p("kubeconfig-guest")
    with open(kubeconfig, "w") as f:
        f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster: {{server: "https://{GUEST_HOST}:{api_port}", certificate-authority-data: {ca}}}
users:
- name: admin
  user: {{token: {token}}}
contexts:
- name: bench
  context: {{cluster: bench, user: admin}}
current-context: bench
""")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), control_handler(Bench(api)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"READY {api_port} {server.server_address[1]} {kubeconfig}", flush=True)
    # Until the bench script stops us, or is gone.
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1)
    stop()


if __name__ == "__main__":
    main()
