//! The real `upgate` binary as a child process, for tests of what only a process shows
//! (signals, exit codes, stdout logs, restarts, memory).

use std::io::Read;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config_toml;

/// The `upgate` binary running with a config file, its stdout collected.
pub struct Binary {
    pub child: Child,
    pub api: String,
    pub admin: String,
    stdout: Arc<Mutex<Vec<u8>>>,
    _dir: tempfile::TempDir,
}

impl Binary {
    /// Starts the binary with the test tenants, `extra_config` at the top level of the file
    /// (filesystem storage in a tempdir unless it sets `storage`), and extra environment.
    pub fn start(extra_config: &str, env: &[(&str, &str)]) -> Binary {
        Self::start_edited(extra_config, env, |cfg| cfg)
    }

    /// As [`Binary::start`], with the whole config file passed through `edit` (to add
    /// tables inside a tenant's).
    pub fn start_edited(
        extra_config: &str,
        env: &[(&str, &str)],
        edit: impl FnOnce(String) -> String,
    ) -> Binary {
        Self::launch(extra_config, env, edit, upgate_testkit::free_port())
    }

    /// As [`Binary::start`], listening on `api_port` (a restarted gateway at the address
    /// its clients know).
    #[allow(dead_code)] // not every test binary restarts a gateway on its port
    pub fn start_on(extra_config: &str, env: &[(&str, &str)], api_port: u16) -> Binary {
        Self::launch(extra_config, env, |cfg| cfg, api_port)
    }

    fn launch(
        extra_config: &str,
        env: &[(&str, &str)],
        edit: impl FnOnce(String) -> String,
        api_port: u16,
    ) -> Binary {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin_port = upgate_testkit::free_port();
        let storage = if extra_config.contains("storage =") {
            String::new()
        } else {
            format!(
                "storage = \"file://{}\"\n",
                dir.path().join("data").display()
            )
        };
        let cfg = config_toml(&format!("{storage}{extra_config}"))
            .replace("admin_listen = \"127.0.0.1:0\"", "ADMIN_LISTEN")
            .replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{api_port}\""),
            )
            .replace(
                "ADMIN_LISTEN",
                &format!("admin_listen = \"127.0.0.1:{admin_port}\""),
            );
        let cfg = edit(cfg);
        let path = dir.path().join("upgate.toml");
        std::fs::write(&path, cfg).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_upgate"));
        cmd.arg("--config")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for k in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "RUST_LOG",
            "UPGATE_LOG_FORMAT",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn upgate");
        let mut stderr = child.stderr.take();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut out) = child.stdout.take() {
            let sink = stdout.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&buf[..n]);
                }
            });
        }
        let mut bin = Binary {
            child,
            api: format!("127.0.0.1:{api_port}"),
            admin: format!("127.0.0.1:{admin_port}"),
            stdout,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&bin.admin).is_err() || TcpStream::connect(&bin.api).is_err() {
            if Instant::now() > deadline || matches!(bin.child.try_wait(), Ok(Some(_))) {
                let _ = bin.child.kill();
                let mut err = String::new();
                if let Some(e) = stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("upgate did not start listening: {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bin
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// POSTs `body` as tenant a and returns the JSON answer.
    pub async fn post_json(
        &self,
        client: &reqwest::Client,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        client
            .post(self.url(path))
            .bearer_auth(super::KEY_A)
            .json(&body)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json")
    }

    /// Creates a session as tenant a and registers one file (`file` is the register body);
    /// returns the session id and the file resource.
    pub async fn session_with_file(
        &self,
        client: &reqwest::Client,
        file: serde_json::Value,
    ) -> (String, serde_json::Value) {
        let s = self
            .post_json(client, "/v1/sessions", serde_json::json!({}))
            .await;
        let session = s["sessionId"].as_str().expect("sessionId").to_owned();
        let f = self
            .post_json(client, &format!("/v1/sessions/{session}/files"), file)
            .await;
        (session, f)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit (bounded) and returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
    pub fn proc_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(field).and_then(|r| {
                    r.trim_start_matches(':')
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
            })
            .unwrap_or_else(|| panic!("{field} missing"))
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
