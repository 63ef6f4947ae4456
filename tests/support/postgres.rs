//! A private PostgreSQL cluster for the tests: `initdb` in a temporary folder,
//! `wal_level=logical`, a free port, SCRAM-SHA-256 over TCP, TLS, and the
//! smallest `logical_decoding_work_mem` (64 kB), so that every transaction
//! beyond a few hundred rows is streamed to the connector before it commits
//! (protocol 2) and the tests exercise that path. One cluster serves
//! every test in a test binary (each test gets its own database) and stops when
//! the test process ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The role the pipelines connect as (password over TCP, so SCRAM is exercised).
pub const USER: &str = "oppen_test";
pub const PASSWORD: &str = "pw-Zq8-secret";

/// A running private cluster.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub bindir: PathBuf,
}

fn bindir() -> PathBuf {
    let out = Command::new("pg_config").arg("--bindir").output().unwrap_or_else(|e| {
        panic!("pg_config not found ({e}): install the PostgreSQL server (Debian: postgresql) to run these tests")
    });
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command run as the `postgres` OS user when we are root (the server
/// refuses to run as root).
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Cluster {
    /// The cluster of this test process, started on first use.
    pub fn get() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(Cluster::start)
    }

    fn start() -> Cluster {
        let bindir = bindir();
        let port = super::free_port();
        let dir = std::env::temp_dir().join(format!("oppen-pg-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(ok.success(), "chown of the cluster folder failed");
        }
        let data = dir.join("data");
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, "postgres-admin\n").unwrap();
        let out = as_server_user(&bindir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A test CA and a server certificate it signed for localhost and
        // 127.0.0.1, so TLS is there to test (with and without verification).
        let (ca_key, ca) = (dir.join("ca.key"), dir.join("ca.crt"));
        let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
        let csr = dir.join("server.csr");
        let ext = dir.join("server.ext");
        std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        let p = |p: &PathBuf| p.display().to_string();
        for args in [
            format!(
                "req -x509 -newkey rsa:2048 -nodes -days 3 -subj /CN=oppen-test-ca -keyout {} -out {}",
                p(&ca_key),
                p(&ca)
            ),
            format!(
                "req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout {} -out {}",
                p(&key),
                p(&csr)
            ),
            format!(
                "x509 -req -in {} -CA {} -CAkey {} -CAcreateserial -days 3 -extfile {} -out {}",
                p(&csr),
                p(&ca),
                p(&ca_key),
                p(&ext),
                p(&cert)
            ),
        ] {
            let out = Command::new("openssl")
                .args(args.split(' '))
                .output()
                .unwrap_or_else(|e| {
                    panic!("openssl not found ({e}): install it to run these tests")
                });
            assert!(
                out.status.success(),
                "openssl {args}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .args([&cert, &key])
                .status()
                .unwrap();
            assert!(ok.success(), "chown of the server key failed");
        }
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c ssl=on -c ssl_cert_file={} \
             -c ssl_key_file={} -c logical_decoding_work_mem=64kB -c wal_level=logical -c max_replication_slots=64 \
             -c max_wal_senders=64 -c max_connections=200 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c shared_buffers=256MB -c max_wal_size=4GB",
            dir.display(),
            cert.display(),
            key.display()
        );
        let out = as_server_user(&bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the private PostgreSQL cluster did not start: {} (log: {})",
            String::from_utf8_lossy(&out.stderr),
            dir.join("server.log").display()
        );
        // Stop the cluster when this test process ends, however it ends.
        let stop = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {runas} {pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            runas = if is_root() {
                "runuser -u postgres --"
            } else {
                ""
            },
            pg_ctl = bindir.join("pg_ctl").display(),
            data = data.display(),
            dir = dir.display(),
        );
        // `setsid -f` forks the watcher into its own session and returns at once.
        Command::new("setsid")
            .args(["-f", "sh", "-c", &stop])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("setsid/sh to watch the test process");
        let cluster = Cluster { dir, port, bindir };
        cluster.psql(
            "postgres",
            &format!("CREATE ROLE {USER} LOGIN REPLICATION CREATEDB PASSWORD '{PASSWORD}'"),
        );
        cluster
    }

    /// The test CA that signed the server's certificate (for `verify-full`).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Runs SQL as the superuser over the socket; panics with psql's message on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A new database owned by the test role; returns its URL for pipelines.
    pub fn database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {USER}"));
        self.url(name)
    }

    /// The URL of a database as the test role, over TCP with a password.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{db}",
            PASSWORD, self.port
        )
    }

    /// A client for a database as the test role.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    return client;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("connecting to the test cluster: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot connect to the private PostgreSQL cluster: {e}"),
            }
        }
    }
}
