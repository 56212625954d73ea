//! Where each end of a sync is, and running commands there: this machine, or a host reached
//! by ssh (one connection shared by every command of a cycle).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{anyhow, Context, Result};

/// ssh options that suit a stream that is compressed already: the fastest cipher with AES-NI
/// first, and no second compression (see the README's ssh advice).
const SSH_DEFAULTS: &[&str] = &[
    "-c",
    "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-ctr",
    "-o",
    "Compression=no",
    "-o",
    "BatchMode=yes",
];

/// One end of a sync, as the command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A path on this machine.
    Local(PathBuf),
    /// `[USER@]HOST:PATH`.
    Remote {
        /// `HOST` or `USER@HOST`.
        host: String,
        /// The path on that host.
        path: String,
    },
}

impl Location {
    /// Parses an end as scp and rsync do: a colon before any slash makes `HOST:PATH`; a path
    /// with a slash before its first colon (`./a:b`, `/mnt/a:b`) is local.
    pub fn parse(s: &str) -> Location {
        match s.split_once(':') {
            Some((host, path)) if !host.is_empty() && !host.contains('/') && !path.is_empty() => {
                Location::Remote {
                    host: host.to_string(),
                    path: path.to_string(),
                }
            }
            _ => Location::Local(PathBuf::from(s)),
        }
    }

    /// The host, for a remote end.
    pub fn host(&self) -> Option<&str> {
        match self {
            Location::Local(_) => None,
            Location::Remote { host, .. } => Some(host),
        }
    }

    /// The path, as the side it is on names it.
    pub fn path(&self) -> String {
        match self {
            Location::Local(p) => p.display().to_string(),
            Location::Remote { path, .. } => path.clone(),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Remote { host, path } => write!(f, "{host}:{path}"),
        }
    }
}

/// How remote commands are run: the ssh command and its options, the remote blkdelta, and
/// the master connection every command of the cycle goes through.
#[derive(Debug)]
pub struct Ssh {
    argv: Vec<String>,
    remote_blkdelta: Vec<String>,
    /// The directory of the master connection's socket, removed on drop.
    control: Option<tempfile::TempDir>,
    masters: Vec<String>,
}

impl Ssh {
    /// `command` is `--ssh-command` (split on white space: `ssh -p 2222 -i KEY`),
    /// `remote_blkdelta` is `--remote-blkdelta` (`sudo blkdelta` works).
    pub fn new(command: &str, remote_blkdelta: &str) -> Result<Ssh> {
        let argv: Vec<String> = command.split_whitespace().map(str::to_string).collect();
        let remote: Vec<String> = remote_blkdelta
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if argv.is_empty() || remote.is_empty() {
            return Err(anyhow!(crate::UsageError(
                "--ssh-command and --remote-blkdelta may not be empty".into()
            )));
        }
        Ok(Ssh {
            argv,
            remote_blkdelta: remote,
            control: None,
            masters: Vec::new(),
        })
    }

    /// Opens the master connection to `host` that later commands share, so that a cycle
    /// pays for one ssh handshake. Best effort: when it cannot be opened, every command
    /// connects on its own (and says why it failed, if it does).
    pub fn open_master(&mut self, host: &str) {
        if self.control.is_none() {
            self.control = tempfile::Builder::new()
                .prefix("blkdelta-ssh")
                .tempdir()
                .ok();
        }
        let Some(dir) = &self.control else { return };
        let socket = dir.path().join(format!("{}", self.masters.len()));
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .args(SSH_DEFAULTS)
            .args(["-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-S"])
            .arg(&socket)
            .args(["-n", host, "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if cmd.status().is_ok_and(|s| s.success()) {
            self.masters.push(host.to_string());
        }
    }

    /// The socket of `host`'s master connection, if one is open.
    fn socket(&self, host: &str) -> Option<PathBuf> {
        let dir = self.control.as_ref()?;
        let k = self.masters.iter().position(|h| h == host)?;
        Some(dir.path().join(k.to_string()))
    }

    /// `ssh [options] HOST 'word' 'word' …`: the remote shell sees each word quoted.
    fn command(&self, host: &str, words: &[String]) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]).args(SSH_DEFAULTS);
        if let Some(socket) = self.socket(host) {
            cmd.arg("-S").arg(socket);
        }
        let line: Vec<String> = words.iter().map(|w| quote(w)).collect();
        cmd.arg("--").arg(host).arg(line.join(" "));
        cmd
    }
}

impl Drop for Ssh {
    fn drop(&mut self) {
        for host in self.masters.clone() {
            if let Some(socket) = self.socket(&host) {
                let _ = Command::new(&self.argv[0])
                    .args(&self.argv[1..])
                    .arg("-S")
                    .arg(socket)
                    .args(["-O", "exit", &host])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// A word for a POSIX shell: as it is when it holds nothing the shell reads, else in single
/// quotes.
pub fn quote(w: &str) -> String {
    let plain = !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// One end: where its commands run.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    /// The host, or `None` for this machine.
    pub host: Option<&'a str>,
    ssh: &'a Ssh,
}

impl<'a> Side<'a> {
    /// The side `loc` is on.
    pub fn of(loc: &'a Location, ssh: &'a Ssh) -> Side<'a> {
        Side {
            host: loc.host(),
            ssh,
        }
    }

    /// The side of another `host`, through the same ssh.
    pub fn on(&self, host: &'a str) -> Side<'a> {
        Side {
            host: Some(host),
            ssh: self.ssh,
        }
    }

    /// `blkdelta ARGS` on this side.
    pub fn blkdelta(&self, args: &[&str]) -> Result<Command> {
        match self.host {
            None => {
                let exe = std::env::current_exe().context("cannot find the blkdelta binary")?;
                let mut cmd = Command::new(exe);
                cmd.args(args);
                Ok(cmd)
            }
            Some(host) => {
                let mut words = self.ssh.remote_blkdelta.clone();
                words.extend(args.iter().map(|a| a.to_string()));
                Ok(self.ssh.command(host, &words))
            }
        }
    }

    /// `PROGRAM ARGS` (qemu-img) on this side.
    pub fn tool(&self, program: &str, args: &[&str]) -> Command {
        match self.host {
            None => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                cmd
            }
            Some(host) => {
                let mut words = vec![program.to_string()];
                words.extend(args.iter().map(|a| a.to_string()));
                self.ssh.command(host, &words)
            }
        }
    }

    /// Runs `cmd` to the end; its stdout when it succeeds, else an error of one line that
    /// names the host and what the command said last.
    pub fn run(&self, mut cmd: Command, what: &str) -> Result<Vec<u8>> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", program(&cmd)))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(self.failure(what, &out))
    }

    /// Runs `cmd`; its output whatever its exit status (a command that answers on stdout
    /// and fails, as `status --json` of a target with no replica).
    pub fn output(&self, mut cmd: Command) -> Result<Output> {
        cmd.stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", program(&cmd)))
    }

    /// The error of a command that failed on this side, in one line: `HOST: WHAT: LAST LINE`.
    pub fn failure(&self, what: &str, out: &Output) -> anyhow::Error {
        self.failed(what, out.status.code(), &out.stderr)
    }

    /// [`Side::failure`] from an exit code and the stderr it left.
    pub fn failed(&self, what: &str, code: Option<i32>, stderr: &[u8]) -> anyhow::Error {
        let text = String::from_utf8_lossy(stderr);
        let last = text
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .trim_start_matches("blkdelta: ")
            .to_string();
        let said = match (code, last.is_empty()) {
            (_, false) => last,
            (Some(c), true) => format!("exit status {c}"),
            (None, true) => "killed by a signal".to_string(),
        };
        match (self.host, code) {
            (Some(host), Some(255)) => anyhow!("{host}: ssh failed while {what}: {said}"),
            (Some(host), _) => anyhow!("{host}: {what}: {said}"),
            (None, _) => anyhow!("{what}: {said}"),
        }
    }
}

/// The program a command runs, for messages.
fn program(cmd: &Command) -> String {
    Path::new(cmd.get_program()).display().to_string()
}

/// Keeps the last 64 KiB a child writes to stderr (read on a thread, so the child never
/// blocks on a full pipe).
pub struct StderrTail(Option<std::thread::JoinHandle<Vec<u8>>>);

impl StderrTail {
    /// Starts reading `child`'s stderr, which must be piped.
    pub fn of(child: &mut Child) -> StderrTail {
        let Some(mut err) = child.stderr.take() else {
            return StderrTail(None);
        };
        StderrTail(Some(std::thread::spawn(move || {
            const KEEP: usize = 64 << 10;
            let mut kept = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * KEEP {
                    kept.drain(..kept.len() - KEEP);
                }
            }
            kept
        })))
    }

    /// What the child wrote, once it closed stderr.
    pub fn take(self) -> Vec<u8> {
        self.0.and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_parse_as_scp_and_rsync_read_them() {
        let remote = |h: &str, p: &str| Location::Remote {
            host: h.into(),
            path: p.into(),
        };
        assert_eq!(
            Location::parse("backup:/srv/vm.qcow2"),
            remote("backup", "/srv/vm.qcow2")
        );
        assert_eq!(
            Location::parse("root@backup:vm.qcow2"),
            remote("root@backup", "vm.qcow2")
        );
        for local in [
            "/mnt/usb/vm.qcow2",
            "vm.qcow2",
            "./a:b",
            "/srv/a:b",
            ":x",
            "host:",
        ] {
            assert_eq!(
                Location::parse(local),
                Location::Local(local.into()),
                "{local}"
            );
        }
    }

    #[test]
    fn words_reach_the_remote_shell_as_they_are() {
        assert_eq!(quote("/srv/vm.qcow2"), "/srv/vm.qcow2");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn a_remote_failure_is_one_line_naming_the_host() {
        let ssh = Ssh::new("ssh", "blkdelta").unwrap();
        let loc = Location::parse("backup:/srv/r.qcow2");
        let side = Side::of(&loc, &ssh);
        let e = side.failed(
            "receiving",
            Some(1),
            b"some noise\nblkdelta: cannot receive: the replica changed\n",
        );
        assert_eq!(
            e.to_string(),
            "backup: receiving: cannot receive: the replica changed"
        );
        let e = side.failed(
            "asking what it holds",
            Some(255),
            b"ssh: connect to host backup port 22: Connection refused\n",
        );
        assert!(
            e.to_string().starts_with("backup: ssh failed while asking"),
            "{e}"
        );
    }
}
