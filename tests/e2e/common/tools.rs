//! The programs the tests run besides blkdelta, and what a test does when one is missing: it
//! skips loudly, naming the package that provides it, or, with `BLKDELTA_REQUIRE_TOOLS=1` (as
//! CI sets), fails.

use std::process::{Command, Stdio};

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
