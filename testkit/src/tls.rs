//! Certificates generated per test (rcgen) and a `redis-server` that speaks TLS with them.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

use crate::{free_port, RedisServer};

/// A certificate authority and a server certificate it signed for `127.0.0.1` and
/// `localhost`, written as PEM files into a temporary directory.
pub struct TestCerts {
    dir: tempfile::TempDir,
}

impl TestCerts {
    /// Generates a fresh CA and server certificate.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("tempdir for certificates");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
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
        let tls_port_s = tls_port.to_string();
        let cert = certs.path("server.pem");
        let key = certs.path("server.key");
        let ca = certs.ca_file();
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
        let server = RedisServer::start_with(&args);
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

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}
