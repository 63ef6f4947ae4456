//! A private S3-compatible server (`moto_server`, from PyPI) on a free port.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running moto server; stopped when dropped.
pub struct Moto {
    child: Child,
    /// The endpoint URL.
    pub endpoint: String,
    port: u16,
}

impl Moto {
    /// Starts moto on a free port. Fails the test with how to install it when it
    /// is missing (scripts/test installs it).
    pub fn start() -> Self {
        // A free port may be taken by another test's server before moto binds
        // it (moto then exits, and what answered on the port goes away later):
        // a server that is not moto answering HTTP is tried again on another port.
        for _ in 0..5 {
            let port = super::free_port();
            let child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start moto_server ({e}): install it with `pip install 'moto[server]'` (scripts/test does this)")
                });
            let mut moto = Self {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
                port,
            };
            super::wait_for_port(port, "moto_server", String::new);
            if moto.answers() && moto.child.try_wait().unwrap().is_none() {
                return moto;
            }
        }
        panic!("moto_server did not start on any of five free ports")
    }

    /// Whether an S3 request on the port gets moto's answer.
    fn answers(&self) -> bool {
        self.request("GET /").is_ok_and(|response| {
            response.starts_with("HTTP/1.1 200") && response.contains("ListAllMyBucketsResult")
        })
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let response = self
            .request(&format!("PUT /{bucket}"))
            .unwrap_or_else(|e| panic!("creating bucket {bucket}: {e}"));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "creating bucket {bucket}: {response}"
        );
    }

    /// Sends `method_and_path` without a body and returns the whole response.
    fn request(&self, method_and_path: &str) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        // What answers on the port may not be moto and may never reply.
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            stream,
            "{method_and_path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    }

    /// A client for checking what a test wrote, with moto's test credentials.
    pub fn client(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .build()
            .unwrap()
    }

    /// The environment an `oppen` process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of a server that can be taken down and brought back,
/// to simulate the server going away in the middle of a version.
pub struct Proxy {
    /// The endpoint URL of the proxy.
    pub endpoint: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    /// Forwards a free local port to `target_port`.
    pub fn start(target_port: u16) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(AtomicU64::new(0));
        let (up2, generation2) = (up.clone(), generation.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    drop(client); // refused: the server is "down"
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let born = generation2.load(Ordering::SeqCst);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    let (up3, generation3) = (up2.clone(), generation2.clone());
                    std::thread::spawn(move || {
                        from.set_read_timeout(Some(Duration::from_millis(100))).ok();
                        let mut buf = [0u8; 64 * 1024];
                        loop {
                            // Connections made before an outage die with it.
                            if !up3.load(Ordering::SeqCst)
                                || generation3.load(Ordering::SeqCst) != born
                            {
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => {
                                    let _ = to.shutdown(std::net::Shutdown::Write);
                                    return;
                                }
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            up,
            generation,
        }
    }

    /// Takes the server away: open connections are cut, new ones refused.
    pub fn down(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Brings it back.
    pub fn up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Moto {
    /// The port moto listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}
