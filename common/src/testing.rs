//! What the tests of several crates share (the `test-utils` feature): a reproducible random
//! sequence, stream headers of one shape, and the check for a program a test runs.

use std::process::{Command, Stdio};

use crate::stream::{SnapRef, SourceInfo, StreamHeader, Transition};

/// xorshift64*: reproducible test sequences without a dependency (`bench/metaops.py`
/// implements it too).
pub struct Rng(pub u64);

impl Rng {
    /// The next number of the sequence.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Bytes that are mostly one value with a few others sprinkled in (cheap to make).
    pub fn bytes(&mut self, len: u64) -> Vec<u8> {
        let mut v = vec![self.next_u64() as u8; len as usize];
        for _ in 0..8.min(len) {
            let at = self.below(len) as usize;
            v[at] = self.next_u64() as u8;
        }
        v
    }
}

/// A snapshot named `name` whose GUID is 16 bytes of `n`.
pub fn snap(name: &str, n: u8) -> SnapRef {
    SnapRef {
        name: name.into(),
        guid: [n; 16],
    }
}

/// `from → to` (a full stream when `from` is `None`) leaving a disk of `virtual_size` bytes.
pub fn transition(from: Option<&SnapRef>, to: &SnapRef, virtual_size: u64) -> Transition {
    Transition {
        from: from.cloned(),
        to: to.clone(),
        virtual_size,
    }
}

/// The header of a stream of vm.qcow2 (stream id all 0xee) carrying `transitions`, sized as
/// the last one, with no totals and no resume offset.
pub fn stream_header(transitions: Vec<Transition>) -> StreamHeader {
    StreamHeader {
        stream_id: [0xee; 16],
        virtual_size: transitions.last().map_or(0, |t| t.virtual_size),
        source: SourceInfo {
            kind: "qcow2".into(),
            name: "vm.qcow2".into(),
        },
        transitions,
        total_extents: 0,
        total_data_bytes: 0,
        total_zero_bytes: 0,
        resume_offset: 0,
    }
}

/// The environment variable that turns a skip for a missing tool into a failure.
pub const REQUIRE_TOOLS: &str = "BLKDELTA_REQUIRE_TOOLS";

/// The Debian package that provides `program`.
fn package_of(program: &str) -> &'static str {
    match program.rsplit('/').next().unwrap_or(program) {
        "qemu-img" | "qemu-io" | "qemu-nbd" | "qemu-storage-daemon" => "qemu-utils",
        "ssh" | "ssh-keygen" => "openssh-client",
        "sshd" => "openssh-server",
        "losetup" | "mount" | "umount" => "mount",
        "mkfs.ext4" => "e2fsprogs",
        "script" => "bsdutils",
        "strace" => "strace",
        _ => "coreutils",
    }
}

/// Whether the tests must not skip for lack of a tool or a capability.
fn tools_required() -> bool {
    std::env::var(REQUIRE_TOOLS).is_ok_and(|v| v == "1")
}

/// Whether a program is on the PATH (or, given as a path, executable there). When it is not,
/// prints a loud skip notice, or panics under `BLKDELTA_REQUIRE_TOOLS=1`.
pub fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        let package = package_of(program);
        assert!(
            !tools_required(),
            "{program} is required ({REQUIRE_TOOLS}=1): apt-get install {package}"
        );
        eprintln!("SKIPPED: {program} is not installed (apt-get install {package})");
    }
    found
}

/// Reports that this machine cannot do `what` (attach a loop device, mount): a loud skip
/// notice, or a panic under `BLKDELTA_REQUIRE_TOOLS=1`.
pub fn cannot(what: &str, why: &str) {
    assert!(
        !tools_required(),
        "{what} is required ({REQUIRE_TOOLS}=1), but: {why}"
    );
    eprintln!("SKIPPED: cannot {what}: {why}");
}
