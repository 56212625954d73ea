//! Where each end of a sync is, and running commands there: this machine, or a host reached
//! by ssh (one connection shared by every command of a cycle).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{anyhow, Context, Result};

/// Whether each step says what it ran and how long it took (`sync --verbose`).
pub static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// With `--verbose`: one line on stderr for a step that began at `started`.
pub fn trace(what: &str, started: std::time::Instant) {
    if VERBOSE.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "blkdelta sync: {what}: {:.3} s",
            started.elapsed().as_secs_f64()
        );
    }
}

/// The words of `cmd`, for --verbose.
fn words(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|w| w.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

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

    /// Says that commands will go to `host`: the first of them opens the master connection
    /// the others share (`ControlMaster=auto`, kept 60 s after the last session, closed when
    /// this is dropped), so that a cycle pays for one ssh handshake. Best effort: without a
    /// directory for its socket, every command connects on its own.
    pub fn use_host(&mut self, host: &str) {
        if self.control.is_none() {
            self.control = tempfile::Builder::new()
                .prefix("blkdelta-ssh")
                .tempdir()
                .ok();
        }
        if self.control.is_some() && !self.masters.iter().any(|h| h == host) {
            self.masters.push(host.to_string());
        }
    }

    /// The socket of `host`'s master connection.
    fn socket(&self, host: &str) -> Option<PathBuf> {
        let dir = self.control.as_ref()?;
        let k = self.masters.iter().position(|h| h == host)?;
        Some(dir.path().join(k.to_string()))
    }

    /// `ssh [options] HOST LINE`: the remote shell runs LINE.
    fn command_line(&self, host: &str, line: String) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]).args(SSH_DEFAULTS);
        if let Some(socket) = self.socket(host) {
            cmd.args(["-o", "ControlMaster=auto", "-o", "ControlPersist=60", "-S"])
                .arg(socket);
        }
        cmd.arg("--").arg(host).arg(line);
        cmd
    }

    /// `ssh [options] HOST 'word' 'word' …`: the remote shell sees each word quoted.
    fn command(&self, host: &str, words: &[String]) -> Command {
        self.command_line(host, quoted(words))
    }

    /// `ssh [options] HOST 'a' 'b' && { 'c' 'd' || exit 97; }`: `then` runs when `first`
    /// succeeded, and its failure exits with [`THEN_FAILED`].
    fn command_then(&self, host: &str, first: &[String], then: &[String]) -> Command {
        let line = format!(
            "{} && {{ {} || exit {THEN_FAILED}; }}",
            quoted(first),
            quoted(then)
        );
        self.command_line(host, line)
    }
}

/// Words for a POSIX shell, each quoted.
fn quoted(words: &[String]) -> String {
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
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

/// The most a command's answer on stdout may hold (a status, a snapshot list, a prune's
/// report); a block list goes into a file instead ([`Side::run_into`]).
pub const MAX_ANSWER: u64 = 64 << 20;

/// The exit status of a remote pair of commands whose second failed ([`Side::blkdelta_then`]).
pub const THEN_FAILED: i32 = 97;

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

    /// On a remote side, `blkdelta FIRST && blkdelta THEN` in one session (the second's
    /// failure exits with [`THEN_FAILED`]); here, `None`: run them one after the other.
    pub fn blkdelta_then(&self, first: &[&str], then: &[&str]) -> Option<Command> {
        let host = self.host?;
        let words = |args: &[&str]| {
            let mut w = self.ssh.remote_blkdelta.clone();
            w.extend(args.iter().map(|a| a.to_string()));
            w
        };
        Some(self.ssh.command_then(host, &words(first), &words(then)))
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
    pub fn run(&self, cmd: Command, what: &str) -> Result<Vec<u8>> {
        let out = self.output(cmd)?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(self.failure(what, &out))
    }

    /// Runs `cmd`; its output whatever its exit status (a command that answers on stdout
    /// and fails, as `status --json` of a target with no replica). An answer of more than
    /// [`MAX_ANSWER`] bytes is refused (the other side is not what it should be), and only
    /// the end of stderr is kept.
    pub fn output(&self, mut cmd: Command) -> Result<Output> {
        let started = std::time::Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", program(&cmd)))?;
        let tail = StderrTail::of(&mut child);
        let mut stdout = Vec::new();
        let read = child
            .stdout
            .take()
            .map(|o| o.take(MAX_ANSWER + 1).read_to_end(&mut stdout))
            .transpose();
        if stdout.len() as u64 > MAX_ANSWER {
            let _ = child.kill();
            let _ = child.wait();
            let host = self.host.map_or(String::new(), |h| format!("{h}: "));
            return Err(anyhow!(
                "{host}{} answered more than {} MiB",
                words(&cmd),
                MAX_ANSWER >> 20
            ));
        }
        let status = child.wait().context("cannot wait for a command")?;
        read.context("cannot read a command's answer")?;
        trace(&words(&cmd), started);
        Ok(Output {
            status,
            stdout,
            stderr: tail.take(),
        })
    }

    /// Runs `cmd` with its stdout into `file` (a block list, as long as the disk is large);
    /// an error of one line naming the host when it fails.
    pub fn run_into(&self, mut cmd: Command, file: std::fs::File, what: &str) -> Result<()> {
        let started = std::time::Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", program(&cmd)))?;
        let tail = StderrTail::of(&mut child);
        let status = child.wait().context("cannot wait for a command")?;
        trace(&words(&cmd), started);
        if status.success() {
            return Ok(());
        }
        Err(self.failed(what, status.code(), &tail.take()))
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

/// Reads what a child writes to a pipe on a thread (so the child never blocks on a full
/// pipe), keeping the last 64 KiB: its stderr, or the JSON a remote prune prints.
pub struct StderrTail(Option<std::thread::JoinHandle<Vec<u8>>>);

impl StderrTail {
    /// Starts reading `child`'s stderr, which must be piped.
    pub fn of(child: &mut Child) -> StderrTail {
        StderrTail::reading(child.stderr.take())
    }

    /// Starts reading `pipe` (nothing when `None`).
    pub fn reading(pipe: Option<impl Read + Send + 'static>) -> StderrTail {
        let Some(mut pipe) = pipe else {
            return StderrTail(None);
        };
        StderrTail(Some(std::thread::spawn(move || {
            const KEEP: usize = 64 << 10;
            let mut kept = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
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

    /// What the child wrote, once it closed the pipe.
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
    fn a_remote_pair_runs_in_one_session_and_says_which_failed() {
        let mut ssh = Ssh::new("ssh -p 2222", "sudo blkdelta").unwrap();
        ssh.use_host("backup");
        let loc = Location::parse("backup:/srv/my vm.qcow2");
        let side = Side::of(&loc, &ssh);
        let cmd = side
            .blkdelta_then(
                &["receive", "-q", "/srv/my vm.qcow2"],
                &["prune", "--keep", "3"],
            )
            .expect("a remote side");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.last().unwrap(),
            "sudo blkdelta receive -q '/srv/my vm.qcow2' && { sudo blkdelta prune --keep 3 || exit 97; }"
        );
        assert!(args.iter().any(|a| a == "ControlMaster=auto"), "{args:?}");
        let here = Location::parse("/srv/r.qcow2");
        assert!(Side::of(&here, &ssh)
            .blkdelta_then(&["a"], &["b"])
            .is_none());
    }

    #[test]
    fn an_answer_past_the_bound_is_refused_and_a_file_takes_any_size() {
        let ssh = Ssh::new("ssh", "blkdelta").unwrap();
        let here = Location::parse("/srv/r.qcow2");
        let side = Side::of(&here, &ssh);
        let size = (MAX_ANSWER + 1).to_string();
        let e = side
            .output(side.tool("head", &["-c", &size, "/dev/zero"]))
            .unwrap_err();
        assert!(e.to_string().contains("answered more than 64 MiB"), "{e}");
        let file = tempfile::NamedTempFile::new().unwrap();
        side.run_into(
            side.tool("head", &["-c", &size, "/dev/zero"]),
            file.reopen().unwrap(),
            "copying",
        )
        .unwrap();
        assert_eq!(file.as_file().metadata().unwrap().len(), MAX_ANSWER + 1);
        let e = side
            .run_into(side.tool("false", &[]), file.reopen().unwrap(), "failing")
            .unwrap_err();
        assert_eq!(e.to_string(), "failing: exit status 1");
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
