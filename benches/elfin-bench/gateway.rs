//! The gateway under measurement: the release `elfin-gateway` binary, started by the
//! bench in a process of its own with the shipped defaults (so its RSS is its own and
//! it runs as operators run it), or one already running (`--target`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Gateway {
    pub addr: SocketAddr,
    /// A user whose devices the scenarios simulate.
    pub uuid: String,
    pid: Option<u32>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Gateway {
    /// Starts the binary on loopback with a fresh embedded database and `env` on top
    /// of the defaults, and adds a user.
    pub fn start(env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let mut all = vec![
            ("ELFIN__SERVER__LISTEN", "127.0.0.1:0"),
            ("ELFIN__ADMIN__LISTEN", "127.0.0.1:0"),
            ("ELFIN__LOG__LEVEL", "warn"),
        ];
        all.extend_from_slice(env);
        let binary = env!("CARGO_BIN_EXE_elfin-gateway");
        let out = Command::new(binary)
            .current_dir(dir.path())
            .envs(all.iter().copied())
            .args(["user", "add", "bench"])
            .output()
            .expect("run elfin-gateway user add");
        let uuid = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .expect("a uuid")
            .to_owned();
        // "info" only for the line that names the port; warnings after it.
        let mut child = Command::new(binary)
            .current_dir(dir.path())
            .envs(all.iter().copied())
            .env("RUST_LOG", "warn,elfin_gateway=info")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start elfin-gateway");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .and_then(Result::ok)
                .expect("the gateway exited at start");
            if let Some(rest) = line.split(" listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("gateway: {line}");
            }
        });
        Gateway {
            addr,
            uuid,
            pid: Some(child.id()),
            child: Some(child),
            _dir: Some(dir),
        }
    }

    /// A gateway someone else runs.
    pub fn target(addr: SocketAddr, uuid: String, pid: Option<u32>) -> Gateway {
        Gateway {
            addr,
            uuid,
            pid,
            child: None,
            _dir: None,
        }
    }

    /// The gateway's resident memory, when its process is known.
    pub fn rss_kib(&self) -> Option<u64> {
        self.pid.and_then(crate::net::rss_kib)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            // Let the kernel release the sockets before the next scenario.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
