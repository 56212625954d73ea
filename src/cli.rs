//! Command-line arguments: one clap struct per subcommand.

use std::path::PathBuf;

use blkdelta_send::pace::parse_rate;
use clap::{ArgGroup, Args, Parser, Subcommand};

/// Incremental block-level replication of qcow2 images, raw images and block devices.
#[derive(Debug, Parser)]
#[command(name = "blkdelta", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a stream of a source's changes to stdout (never a terminal) or a file.
    Send(Box<SendArgs>),
    /// Apply a stream from stdin or a file to a raw file, a block device or a qcow2 replica.
    Receive(ReceiveArgs),
    /// Print the content digest of a disk: a qcow2 snapshot, a raw file or a block device.
    Checksum(ChecksumArgs),
    /// Print one line per record of a stream.
    Dump(DumpArgs),
    /// Print what a replica holds.
    Status(StatusArgs),
    /// List a qcow2 image's snapshots and bitmaps.
    List(ListArgs),
    /// Read a replica and compare every 1 MiB block with its kept block hashes.
    Verify(VerifyArgs),
    /// Delete the internal snapshots of a qcow2 replica that no --keep rule keeps.
    Prune(PruneArgs),
    /// One replication cycle: snapshot the source, find the newest snapshot the replica
    /// shares with it, send what changed since (locally or over ssh), prune both sides.
    Sync(Box<SyncArgs>),
}

/// Progress and verbosity switches shared by the long-running commands.
#[derive(Debug, Args, Clone, Copy)]
pub struct ProgressArgs {
    /// Show progress on stderr even when it is not a terminal.
    #[arg(long, conflicts_with = "quiet")]
    pub progress: bool,
    /// Show no progress and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `blkdelta send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// IMAGE.qcow2@SNAP (full), IMAGE.qcow2@FROM..TO (incremental), IMAGE.qcow2 (active layer),
    /// a raw file or block device (full; holes are skipped), or an NBD export
    /// nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (full; with --bitmap, what
    /// its dirty bitmap marks). Not with --qmp.
    #[arg(required_unless_present = "qmp", conflicts_with = "qmp")]
    pub source: Option<String>,
    /// The running VM whose disk to send (--qmp, --node, --nbd-socket, --scratch).
    #[command(flatten)]
    pub vm: VmArgs,
    /// With --qmp: the blkdelta-GUID bitmap of the state the replica holds, when a killed run
    /// left several.
    #[arg(
        long,
        value_name = "NAME",
        requires = "qmp",
        help_heading = "Running VM"
    )]
    pub from_bitmap: Option<String>,
    /// With --qmp: send the whole disk and start a new bitmap, whatever bitmaps there are.
    #[arg(long, requires = "qmp", help_heading = "Running VM")]
    pub full: bool,
    /// Send what the persistent dirty bitmap NAME of IMAGE.qcow2 recorded (data from the
    /// active layer; the image must not be in use), or what the NBD export's context
    /// qemu:dirty-bitmap:NAME marks dirty (data from the export).
    #[arg(long, value_name = "NAME", help_heading = "Change sources")]
    pub bitmap: Option<String>,
    /// With --bitmap: accept a disabled bitmap (one that stopped recording writes).
    #[arg(long, requires = "bitmap", help_heading = "Change sources")]
    pub allow_disabled: bool,
    /// Send what the overlays above BASE (a file in SOURCE's backing chain) changed.
    #[arg(long, value_name = "BASE", help_heading = "Change sources")]
    pub since: Option<PathBuf>,
    /// Send the ranges MAP lists: thin_delta XML, era_invalidate XML, or "OFFSET LENGTH" lines
    /// in bytes.
    #[arg(long, value_name = "MAP", help_heading = "Change sources")]
    pub changed_blocks: Option<PathBuf>,
    /// Size of an era block in bytes, for era_invalidate maps.
    #[arg(long, value_name = "BYTES", help_heading = "Change sources")]
    pub era_block_size: Option<u64>,
    /// Send what differs between OLD and SOURCE, found by reading both.
    #[arg(long, value_name = "OLD", help_heading = "Change sources")]
    pub compare: Option<PathBuf>,
    /// Repair: send only the 1 MiB blocks whose hash differs from the block list BLOCKS
    /// (`blkdelta checksum --blocks REPLICA` on the replica's side); apply with
    /// `receive --repair`.
    #[arg(long, value_name = "BLOCKS", help_heading = "Change sources")]
    pub against: Option<PathBuf>,
    /// Name of the state the replica must hold, for sources without an identity of their own
    /// (default: the bitmap's name, BASE's or OLD's file name, SOURCE's file name for maps).
    #[arg(long, value_name = "NAME", help_heading = "Change sources")]
    pub from_name: Option<String>,
    /// Name of the state the stream produces (default: as --from-name for bitmaps and maps,
    /// SOURCE's file name for --since and --compare, the export's name for NBD).
    #[arg(long, value_name = "NAME", help_heading = "Change sources")]
    pub to_name: Option<String>,
    /// Write the stream to FILE instead of stdout (an existing FILE only with --force).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// With -o: replace FILE if it exists.
    #[arg(long, requires = "output")]
    pub force: bool,
    /// Read even if a QEMU writer (a running VM) holds the image, as qemu-img -U: safe for
    /// internal snapshots, not for the active layer.
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// With IMAGE.qcow2@FROM..TO: one transition straight from FROM to TO, leaving out the
    /// snapshots between them (as zfs send -i; without it the replica passes through each).
    #[arg(long)]
    pub direct: bool,
    /// zstd level for payloads, 0 to store them plain.
    #[arg(short = 'l', long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(0..=22))]
    pub level: i32,
    /// Worker threads for reading, hashing and compressing, 1 to 32 (default: the cores, at
    /// most 8).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub threads: Option<u16>,
    /// Pace the stream to RATE bytes per second, with an optional K, M or G suffix (1024-based,
    /// as rsync's --bwlimit): 20M is 20 MiB/s.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Resume an interrupted receive: start where the token `blkdelta status TARGET` printed
    /// says (SOURCE as it was first sent).
    #[arg(long, value_name = "TOKEN")]
    pub resume: Option<String>,
    /// Print the plan (transitions, extents, bytes) from metadata, without reading data.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub progress: ProgressArgs,
}

/// `blkdelta receive`.
#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// A raw image file (created sparse if missing), a block device, or a qcow2 replica that
    /// keeps history (TARGET ending in .qcow2, or an existing qcow2 image).
    pub target: PathBuf,
    /// Read the stream from FILE instead of stdin.
    #[arg(short, long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Where the replica's state lives (default: TARGET.blkdelta for a file,
    /// /var/lib/blkdelta/ for a device).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Apply an incremental onto a replica that does not hold its base.
    #[arg(long)]
    pub rebase: bool,
    /// Write onto a target holding unknown data, or onto a replica changed since blkdelta
    /// last wrote it.
    #[arg(long)]
    pub overwrite: bool,
    /// Apply a stream older than what the replica holds, one it went through already, or a
    /// full stream onto an existing replica of the same source.
    #[arg(long)]
    pub rewind: bool,
    /// All of --rebase, --overwrite and --rewind.
    #[arg(long)]
    pub force: bool,
    /// Apply a repair stream (send --against): accepts a replica whose state is missing,
    /// changed or in progress, once its content matches the stream's block list.
    #[arg(long)]
    pub repair: bool,
    /// Save the old contents of every range the stream overwrites into FILE, a stream that
    /// rolls the replica back (one incremental transition; FILE must not exist).
    #[arg(long, value_name = "FILE")]
    pub undo: Option<PathBuf>,
    /// Read and verify the whole stream and check it against the replica; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Bytes applied between two checkpoints of the resume point (tests use small values).
    #[arg(long, hide = true, default_value_t = 0)]
    pub checkpoint_bytes: u64,
    /// Keep the replica as a qcow2 image that keeps every snapshot it reaches, or as raw
    /// bytes (default: qcow2 for an existing qcow2 image or a new TARGET ending in .qcow2).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<FormatArg>,
    /// Cluster size of a new qcow2 replica: a power of two from 512 to 2M (K/M suffixes).
    #[arg(long, value_name = "SIZE", value_parser = parse_cluster_size)]
    pub cluster_size: Option<u32>,
    #[command(flatten)]
    pub progress: ProgressArgs,
}

/// What a replica is kept as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// A qcow2 image with one internal snapshot per snapshot reached.
    Qcow2,
    /// The disk's bytes (a raw file or a block device).
    Raw,
}

/// log2 of a cluster size given as bytes with an optional K or M suffix.
fn parse_cluster_size(s: &str) -> Result<u32, String> {
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1),
    };
    let bytes = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size"))?;
    if !bytes.is_power_of_two() || !(512..=(2 << 20)).contains(&bytes) {
        return Err(format!(
            "{bytes} bytes: a cluster size is a power of two from 512 to 2M"
        ));
    }
    Ok(bytes.trailing_zeros())
}

/// `blkdelta checksum`.
#[derive(Debug, Args)]
pub struct ChecksumArgs {
    /// IMAGE.qcow2[@SNAP], a raw file or a block device.
    pub image: String,
    /// Read even if a QEMU writer (a running VM) holds the image, as qemu-img -U: safe for
    /// internal snapshots, not for the active layer.
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// Replica state of a block device, whose virtual size bounds the digest.
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Worker threads, 1 to 32 (default: the cores, at most 8).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub threads: Option<u16>,
    /// For a replica: read it, even when its kept block hashes could answer.
    #[arg(long)]
    pub read: bool,
    /// Print the hash of every 1 MiB block (a block list, for `send --against`) instead of
    /// the digest.
    #[arg(long)]
    pub blocks: bool,
}

/// `blkdelta verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The replica: a raw image file or a block device.
    pub target: PathBuf,
    /// Where the replica's state lives (as for receive).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Worker threads, 1 to 32 (default: the cores, at most 8).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub threads: Option<u16>,
}

/// `blkdelta prune`: at least one --keep rule is required.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("rules")
        .required(true)
        .multiple(true)
        .args(["keep", "keep_daily", "keep_weekly"])
))]
pub struct PruneArgs {
    /// The replica: a qcow2 image that keeps the snapshots it received.
    pub target: PathBuf,
    /// Where the replica's state lives (as for receive).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Keep the N newest snapshots (in creation order, the snapshot table's).
    #[arg(long, value_name = "N")]
    pub keep: Option<usize>,
    /// Keep the newest snapshot of each of the D most recent days (UTC) that have one.
    #[arg(long, value_name = "D")]
    pub keep_daily: Option<usize>,
    /// Keep the newest snapshot of each of the W most recent ISO weeks (UTC) that have one.
    #[arg(long, value_name = "W")]
    pub keep_weekly: Option<usize>,
    /// Count and delete only snapshots whose names start with PREFIX; keep every other one
    /// (`sync` prunes only its own `blkdelta-` snapshots).
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Print what would be deleted and what stays; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Print nothing (errors still go to stderr).
    #[arg(short, long)]
    pub quiet: bool,
}

/// `blkdelta dump`.
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// The stream file (default: stdin).
    pub file: Option<PathBuf>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// `blkdelta status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The replica: a raw image file or a block device.
    pub target: PathBuf,
    /// Where the replica's state lives (as for receive).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Print the state as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `blkdelta list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// A qcow2 image.
    pub image: PathBuf,
    /// Read even if a QEMU writer (a running VM) holds the image, as qemu-img -U: safe for
    /// internal snapshots, not for the active layer.
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `blkdelta sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// SOURCE TARGET, or TARGET alone with --qmp. SOURCE is a qcow2 image; either end may be
    /// [USER@]HOST:PATH on another machine (reached with ssh), not both.
    #[arg(required = true, num_args = 1..=2, value_name = "[SOURCE] TARGET")]
    pub ends: Vec<String>,
    /// The running VM whose disk to sync (--qmp, --node, --nbd-socket, --scratch): TARGET is
    /// then the only end named.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Send every snapshot between the common one and the new one (like zfs send -I);
    /// by default the stream goes straight from one to the other.
    #[arg(long)]
    pub all: bool,
    /// Keep the N newest blkdelta-* snapshots on the source, never deleting one a replica of
    /// it holds (SOURCE.blkdelta-sync lists them) or one a user made.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub keep_source: usize,
    /// Prune the replica (a qcow2 replica) to its N newest blkdelta-* snapshots.
    #[arg(long, value_name = "N")]
    pub keep: Option<usize>,
    /// Prune the replica to the newest blkdelta-* snapshot of each of D days.
    #[arg(long, value_name = "D")]
    pub keep_daily: Option<usize>,
    /// Prune the replica to the newest blkdelta-* snapshot of each of W ISO weeks.
    #[arg(long, value_name = "W")]
    pub keep_weekly: Option<usize>,
    /// When the replica shares no snapshot with the source (or changed), send only the
    /// 1 MiB blocks whose hashes differ from the replica's, and accept the replica as it is.
    #[arg(long, conflicts_with = "rewind")]
    pub repair: bool,
    /// When the replica shares no snapshot with the source, seed it again in full.
    #[arg(long)]
    pub rewind: bool,
    /// Pace the stream to RATE bytes per second (K/M/G suffixes, 1024-based).
    #[arg(long, value_name = "RATE", value_parser = blkdelta_send::pace::parse_rate)]
    pub bwlimit: Option<u64>,
    /// The ssh command for a remote end (its options too: "ssh -p 2222 -i KEY").
    #[arg(long, value_name = "CMD", default_value = "ssh")]
    pub ssh_command: String,
    /// The blkdelta to run on a remote end.
    #[arg(long, value_name = "PATH", default_value = "blkdelta")]
    pub remote_blkdelta: String,
    /// zstd level of the stream, 0 (none) to 22.
    #[arg(short = 'l', long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(0..=22))]
    pub level: i32,
    /// Wait for another sync of the same source or target to end, instead of refusing.
    #[arg(long)]
    pub wait: bool,
    /// Print the plan (snapshot to create, FROM..TO, bytes, what would be pruned); change
    /// nothing on either side.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of the summary line.
    #[arg(long)]
    pub json: bool,
    /// Print nothing on success (errors still go to stderr).
    #[arg(short, long, conflicts_with = "json")]
    pub quiet: bool,
    /// Say on stderr what each step ran and how long it took.
    #[arg(short, long)]
    pub verbose: bool,
}

/// A running QEMU's disk, reached through QMP (`send --qmp` and `sync --qmp`).
#[derive(Debug, Args)]
pub struct VmArgs {
    /// A running QEMU's QMP socket: the disk --node as it is now, through a point-in-time view
    /// (the whole disk the first time, then what changed since the last time).
    #[arg(
        long,
        value_name = "SOCKET",
        requires = "node",
        help_heading = "Running VM"
    )]
    pub qmp: Option<PathBuf>,
    /// With --qmp: the block node (node-name) of the disk.
    #[arg(
        long,
        value_name = "NODE",
        requires = "qmp",
        help_heading = "Running VM"
    )]
    pub node: Option<String>,
    /// With --qmp: where QEMU's NBD server listens when it already runs one.
    #[arg(
        long,
        value_name = "PATH",
        requires = "qmp",
        help_heading = "Running VM"
    )]
    pub nbd_socket: Option<PathBuf>,
    /// With --qmp: a directory QEMU can create the scratch overlay in (default: the directory
    /// of the disk's image).
    #[arg(
        long,
        value_name = "DIR",
        requires = "qmp",
        help_heading = "Running VM"
    )]
    pub scratch: Option<PathBuf>,
}

impl VmArgs {
    /// The checkpoint's options for these switches (`None` without --qmp).
    pub fn live(
        &self,
        from_bitmap: Option<String>,
        full: bool,
        to_name: Option<String>,
    ) -> Option<blkdelta_send::source::live::LiveOptions> {
        Some(blkdelta_send::source::live::LiveOptions {
            qmp: self.qmp.clone()?,
            node: self.node.clone().unwrap_or_default(),
            nbd_socket: self.nbd_socket.clone(),
            scratch: self.scratch.clone(),
            from_bitmap,
            full,
            to_name,
        })
    }
}
