//! A real sshd on 127.0.0.1 with throwaway keys, for the tests of streams and syncs over ssh.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::files::write_text;
use super::images::Scratch;
use super::run::run;
use super::tools::have;

/// The ssh daemon the tests start.
pub const SSHD: &str = "/usr/sbin/sshd";

/// Whether the programs an ssh test needs are here (the client, ssh-keygen and sshd).
pub fn have_ssh() -> bool {
    have("ssh") && have("ssh-keygen") && have(SSHD)
}

/// An sshd listening on loopback, killed on drop.
pub struct Sshd {
    child: Child,
    pub port: u16,
    pub client_key: PathBuf,
}

impl Sshd {
    /// Starts an sshd whose keys and configuration live in `s`, and waits until it listens.
    pub fn start(s: &Scratch) -> Sshd {
        let (host_key, client_key) = (s.path("host_key"), s.path("client_key"));
        keygen(&host_key);
        keygen(&client_key);
        let auth = s.path("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &auth).unwrap();
        let port = free_port();
        let config = s.path("sshd_config");
        write_text(
            &config,
            &format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PidFile {}\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n",
                host_key.display(),
                auth.display(),
                s.path("sshd.pid").display()
            ),
        );
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        Sshd {
            child,
            port,
            client_key,
        }
    }

    /// The ssh command line that reaches this sshd as root, asking nothing and saying nothing
    /// of its throwaway host key (words split on white space, as `sync --ssh-command` takes it).
    pub fn ssh_command(&self) -> String {
        format!(
            "ssh -p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o LogLevel=ERROR",
            self.port,
            self.client_key.display()
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
