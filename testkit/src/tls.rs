//! Certificates generated per test (rcgen) and a `redis-server` that speaks TLS with them.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

use std::process::Stdio;

use crate::{free_port, redis_cli, wait_cluster_ok, RedisServer};

/// A certificate authority and a server certificate it signed for `127.0.0.1` and
/// `localhost`, written as PEM files into a temporary directory.
pub struct TestCerts {
    dir: tempfile::TempDir,
}

impl TestCerts {
    /// Generates a fresh CA and server certificate.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("tempdir for certificates");
        // Distinct subject names: OpenSSL (redis-server's cluster bus, redis-cli) refuses a
        // server certificate whose subject equals its issuer's (rcgen's default for both).
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "upgate test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca).expect("server certificate");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write ca.pem");
        std::fs::write(dir.path().join("server.pem"), cert.pem()).expect("write server.pem");
        std::fs::write(dir.path().join("server.key"), key.serialize_pem())
            .expect("write server.key");
        TestCerts { dir }
    }

    /// The CA certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A `redis-server` with a plain port (for the harness) and a TLS port (for the code under
/// test), presenting [`TestCerts`]' server certificate; clients need no certificate.
pub struct TlsRedis {
    /// The server; its plain port answers the harness.
    pub server: RedisServer,
    /// The certificates it presents.
    pub certs: TestCerts,
    tls_port: u16,
}

impl TlsRedis {
    /// Starts one with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let certs = TestCerts::generate();
        let tls_port = free_port();
        let server = start_tls_node(&certs, tls_port, extra);
        TlsRedis {
            server,
            certs,
            tls_port,
        }
    }

    /// Starts one with no extra arguments.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `rediss://127.0.0.1:<tls port>`, with `user:password@` when given.
    pub fn url(&self, auth: Option<(&str, &str)>) -> String {
        match auth {
            Some((user, password)) => {
                format!("rediss://{user}:{password}@127.0.0.1:{}", self.tls_port)
            }
            None => format!("rediss://127.0.0.1:{}", self.tls_port),
        }
    }
}

/// A `redis-server` with a plain port and TLS on `tls_port` with `certs`.
fn start_tls_node(certs: &TestCerts, tls_port: u16, extra: &[&str]) -> RedisServer {
    let tls_port_s = tls_port.to_string();
    let (cert, key, ca) = (
        certs.path("server.pem"),
        certs.path("server.key"),
        certs.ca_file(),
    );
    let mut args: Vec<&str> = vec![
        "--tls-port",
        &tls_port_s,
        "--tls-cert-file",
        path_str(&cert),
        "--tls-key-file",
        path_str(&key),
        "--tls-ca-cert-file",
        path_str(&ca),
        "--tls-auth-clients",
        "no",
    ];
    args.extend_from_slice(extra);
    RedisServer::start_with(&args)
}

/// A Redis Cluster of master nodes that speak TLS to clients and to each other
/// (`--tls-cluster yes`), all with one [`TestCerts`]; each node also has a plain port for
/// the harness. Built with `redis-cli --tls --cluster create`.
pub struct TlsRedisCluster {
    /// The certificates every node presents.
    pub certs: TestCerts,
    nodes: Vec<(RedisServer, u16)>,
}

impl TlsRedisCluster {
    /// Starts `masters` nodes and joins them into one cluster covering all 16384 slots.
    pub fn start(masters: usize) -> Self {
        let certs = TestCerts::generate();
        let nodes: Vec<(RedisServer, u16)> = (0..masters)
            .map(|_| {
                let tls_port = free_port();
                let node = start_tls_node(
                    &certs,
                    tls_port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "2000",
                        "--tls-cluster",
                        "yes",
                    ],
                );
                (node, tls_port)
            })
            .collect();
        let ca = certs.ca_file();
        let status = redis_cli()
            .args(["--tls", "--cacert", path_str(&ca), "--cluster", "create"])
            .args(nodes.iter().map(|(_, tls)| format!("127.0.0.1:{tls}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --tls --cluster create");
        assert!(
            status.status.success(),
            "redis-cli --tls --cluster create failed: {}{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        );
        wait_cluster_ok(nodes.iter().map(|(n, _)| n.port()));
        TlsRedisCluster { certs, nodes }
    }

    /// `rediss://127.0.0.1:<tls port>` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(_, tls)| format!("rediss://127.0.0.1:{tls}"))
            .collect()
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}
