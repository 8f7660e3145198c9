"""The two servers the benchmarks compare, started on loopback with equivalent configurations,
and the /proc readings both benchmarks take. Shared by bench/compare.py (turnutils_uclient
load) and bench/load_compare.py (turnpike-load).

Equivalent means: one static long-term user, loopback peers allowed, no per-user or per-source
quota in the way of a load generator on one address, relay ports outside the kernel's ephemeral
range (32768-60999 here) so a relay bind never collides with a client socket, coturn's
10000-19999 and turnpike's 20000-29999 so the two never compete for a port either. Each server
is stopped by the PID this module started it with, nothing else.
"""

import os
import signal
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TURNPIKE = os.path.join(ROOT, "target", "release", "turnpike")
USER, PASSWORD, REALM = "bench", "benchpass", "bench.realm"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port():
    """A port free for both UDP and TCP on 127.0.0.1 (the servers may listen on both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def cpu_seconds(pid):
    """utime + stime of a process and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def raise_fd_limit():
    """Soft file-descriptor limit up to the hard one, inherited by the servers and the load
    generator we start: 5000 allocations are 5000 relay sockets for turnpike, twice that for
    coturn (it gives each UDP client its own connected socket), and 5000 for the generator."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def wait_udp_ready(port, proc=None, timeout=10.0):
    """A STUN Binding request answered means the server is up."""
    req = bytes.fromhex("000100002112a442") + os.urandom(12)
    deadline = time.time() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.time() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode} before answering")
            try:
                s.sendto(req, ("127.0.0.1", port))
                s.recvfrom(2048)
                return
            except OSError:
                time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not answer a Binding request")


def wait_tcp_ready(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing accepts TCP connections on port {port}")


def make_certificate(workdir):
    """A self-signed P-256 certificate for 127.0.0.1, valid 7 days, for both servers."""
    cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "7", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True)
    os.chmod(key, 0o600)
    return cert, key


class Server:
    # Several instances of one server may run in one working directory over a benchmark (a
    # fresh one per scenario): each gets its own numbered log, config and pid file.
    _instances = {}

    def __init__(self, name, argv, ports, workdir):
        self.name, self.ports = name, ports  # ports: transport -> port
        n = Server._instances.get(name, 0) + 1
        Server._instances[name] = n
        self.log_path = os.path.join(workdir, f"{name}-{n}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_udp_ready(ports["udp"], self.proc)
            for t in ("tcp", "tls"):
                if t in ports:
                    wait_tcp_ready(ports[t])
        except Exception as e:
            self.stop()
            raise RuntimeError(f"{name}: {e}; log tail:\n{self.log_tail()}") from None

    @staticmethod
    def instance_number(name):
        return Server._instances.get(name, 0) + 1

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def rss_kib(self):
        return rss_kib(self.proc.pid)

    def log_tail(self, lines=15):
        try:
            self.log.flush()
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except (OSError, ValueError):
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self.log.closed:
            self.log.close()


class Turnpike(Server):
    """turnpike on 127.0.0.1: UDP always; TCP on the UDP port and a TLS port when `streams`
    (needs cert and key); the HTTP API (/metrics) when `api`."""

    def __init__(self, workdir, binary=TURNPIKE, threads=0, cert=None, key=None, streams=False,
                 api=False, log_level="info"):
        ports = {"udp": free_port()}
        tls = ""
        if streams:
            ports["tcp"] = ports["udp"]
            ports["tls"] = free_port()
            tls = (f'tcp_listen = ["127.0.0.1:{ports["tcp"]}"]\n'
                   f'tls_listen = ["127.0.0.1:{ports["tls"]}"]\n')
        self.api = free_port() if api else None
        n = Server.instance_number("turnpike")
        conf = os.path.join(workdir, f"turnpike-{n}.toml")
        with open(conf, "w") as f:
            # drain_secs = 0: SIGTERM ends the process at once instead of waiting for the
            # allocations a load left behind.
            f.write(f"""
listen = ["127.0.0.1:{ports['udp']}"]
{tls}threads = {threads}
realm = "{REALM}"
log_level = "{log_level}"
drain_secs = 0
""")
            if streams:
                f.write(f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
            f.write(f"""[relay]
address = "127.0.0.1"
port_min = 20000
port_max = 29999
[[auth.users]]
name = "{USER}"
password = "{PASSWORD}"
[limits]
allocations_per_user = 0
unauth_replies_per_sec = 0
[peers]
allow_loopback_peers = true
""")
            if api:
                f.write(f'[api]\nlisten = "127.0.0.1:{self.api}"\n')
        os.chmod(conf, 0o600)
        super().__init__("turnpike", [binary, "serve", "--config", conf], ports, workdir)


class Coturn(Server):
    """Debian's turnserver on 127.0.0.1: UDP always; TCP and a TLS port when `streams`. `verbose`
    (-v) adds coturn's per-session usage lines (a few per session, none per packet). Quotas:
    coturn's user-quota and total-quota default to unlimited, and it has no per-source limit
    on 401s."""

    def __init__(self, workdir, threads=0, cert=None, key=None, streams=False, verbose=False):
        ports = {"udp": free_port()}
        n = Server.instance_number("coturn")
        argv = [
            "turnserver", "-n", "--listening-ip=127.0.0.1", f"--listening-port={ports['udp']}",
            "--relay-ip=127.0.0.1", "--min-port=10000", "--max-port=19999",
            "--lt-cred-mech", f"--user={USER}:{PASSWORD}", f"--realm={REALM}",
            "--allow-loopback-peers", "--no-cli", "--no-dtls",
            "--log-file=stdout", "--simple-log", "--no-stdout-log",
            f"--pidfile={workdir}/coturn-{n}.pid",
            # Without this coturn opens /var/lib/turn/turndb (shared with other users).
            f"--db={workdir}/turndb",
        ]
        if verbose:
            argv.append("-v")
        if streams:
            ports["tcp"] = ports["udp"]
            ports["tls"] = free_port()
            argv += [f"--tls-listening-port={ports['tls']}", f"--cert={cert}", f"--pkey={key}"]
        else:
            argv += ["--no-tcp", "--no-tls"]
        if threads:
            argv.append(f"--relay-threads={threads}")
        super().__init__("coturn", argv, ports, workdir)
