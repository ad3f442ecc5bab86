//! `rediss://`: a CA and a server certificate made with the `openssl`
//! command, a `redis-server` serving only TLS, and the whole pipeline over
//! it with `redis.tls_ca_file`; a certificate from another CA is refused
//! with an error naming the certificate problem.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::*;

/// Runs `openssl` with `args` in `dir`; panics with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA: `<name>.pem` and `<name>.key` in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=tripline test {name}"),
        ],
    );
}

/// `server.pem`/`server.key` for 127.0.0.1 and localhost, signed by `ca`.
fn make_server_cert(dir: &Path, ca: &str) {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

/// A `redis-server` listening on TLS only; killed on drop.
struct TlsRedis {
    port: u16,
    child: Child,
    /// The CA's PEM, for the test's own client.
    ca_pem: Vec<u8>,
}

impl TlsRedis {
    /// `None` (after saying why) when this redis-server was built without TLS.
    fn start(dir: &Path) -> Option<TlsRedis> {
        let port = free_port();
        let child = Command::new("redis-server")
            .current_dir(dir)
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redis-server must be installed");
        let mut redis = TlsRedis {
            port,
            child,
            ca_pem: std::fs::read(dir.join("ca.pem")).unwrap(),
        };
        let up = wait_until(Duration::from_secs(10), || {
            redis.conn().is_ok() || redis.child.try_wait().unwrap().is_some()
        });
        if let Some(status) = redis.child.try_wait().unwrap() {
            let mut out = String::new();
            use std::io::Read;
            redis
                .child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            if out.contains("TLS") && out.contains("not") && out.contains("support") {
                eprintln!("SKIPPED: this redis-server has no TLS support: {out}");
                return None;
            }
            panic!("redis-server exited ({status}): {out}");
        }
        assert!(up, "redis-server did not come up on TLS port {port}");
        Some(redis)
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port)
    }

    fn conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::build_with_tls(
            self.url().as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(self.ca_pem.clone()),
            },
        )?
        .get_connection()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const RULE: &str = r#"fn on_message(msg, ctx) {
    alert(#{ name: "OverTls", severity: "critical", labels: #{ hostname: msg.hostname } });
}"#;

fn tls_project(ca_file: &str) -> Project {
    let config = format!(
        "redis:\n  tls_ca_file: {ca_file}\n{}",
        config("  - name: tls\n    streams: [s]\n")
    );
    Project::new(
        &config,
        &[("rules/tls.rhai", RULE), ("plugins/file.yaml", FILE_SINK)],
    )
}

#[test]
fn pipeline_runs_over_rediss_with_a_private_ca_and_refuses_another_ca() {
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path(), "ca");
    make_ca(certs.path(), "other");
    make_server_cert(certs.path(), "ca");
    let Some(redis) = TlsRedis::start(certs.path()) else {
        return;
    };

    let project = tls_project(certs.path().join("ca.pem").to_str().unwrap());
    let (code, stdout, stderr) = project.command(&["check"], Some(&redis.url()));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let tl = project.start_on(&redis.url());
    let mut con = redis.conn().unwrap();
    xadd(&mut con, "s", &[("hostname", b"tls-1")]);
    assert!(
        wait_until(Duration::from_secs(20), || !project
            .json_lines("alerts.jsonl")
            .is_empty()),
        "no alert over TLS:\n{}",
        tl.stderr()
    );
    let alerts = project.json_lines("alerts.jsonl");
    assert_eq!(alerts[0]["name"], "OverTls");
    assert_eq!(alerts[0]["labels"]["hostname"], "tls-1");
    // Read, alerted and acknowledged: nothing left pending.
    assert!(wait_until(Duration::from_secs(10), || group_position(
        &mut con, "s", "tls"
    )
    .0 == 0));
    drop(tl);

    // The same server, trusting another CA: refused, and the log says why.
    let wrong = tls_project(certs.path().join("other.pem").to_str().unwrap());
    let tl = wrong.start_on(&redis.url());
    tl.wait_for_log("invalid peer certificate");
    assert!(tl.stderr().contains("UnknownIssuer"), "{}", tl.stderr());
    assert!(wrong.json_lines("alerts.jsonl").is_empty());

    // Without a CA file the system's roots do not know the private CA either.
    let plain = Project::new(
        &config("  - name: tls\n    streams: [s]\n"),
        &[("rules/tls.rhai", RULE)],
    );
    let tl = plain.start_on(&redis.url());
    tl.wait_for_log("invalid peer certificate");
}

#[test]
fn a_ca_file_for_a_plain_redis_url_is_a_config_error() {
    let project = tls_project("ca.pem");
    project.write(
        "ca.pem",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    );
    let (code, _, stderr) = project.command(&["check"], Some("127.0.0.1:6379"));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("`redis.tls_ca_file`") && stderr.contains("not a `rediss://` URL"),
        "{stderr}"
    );
}
