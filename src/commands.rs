//! One function per subcommand.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use blkdelta_common::blocklist::write_block_list;
use blkdelta_common::digest::image_digest;
use blkdelta_common::image::qcow2::{Layer, Qcow2Image};
use blkdelta_common::image::raw::RawImage;
use blkdelta_common::image::{probe_format, BlockSource, Format, OpenOptions};
use blkdelta_common::stream::ResumeToken;
use blkdelta_common::stream::{Record, StreamReader};
use blkdelta_receive::apply::{describe, receive_path, ReceiveOptions};
use blkdelta_receive::plan::{Overrides, TargetProbe};
use blkdelta_receive::state::{self, default_state_path, Health};
use blkdelta_receive::target::ReplicaFormat;
use blkdelta_receive::ReceiveError;
use blkdelta_send::pace::Paced;
use blkdelta_send::pipeline::{send, SendOptions, SendSummary};
use blkdelta_send::source::live::Checkpoint;
use blkdelta_send::source::{open_source_opts, Resumed, SourceOptions};
use blkdelta_send::SendError;

use crate::cli::{ChecksumArgs, Command, ListArgs, ReceiveArgs, SendArgs, StatusArgs};
use crate::{progress, UsageError};

mod prune;
mod replica;
mod report;

/// The stream's reader (a receive) went away before the stream ended: it has said why, so the
/// sender says nothing more and exits 1.
#[derive(Debug)]
pub struct ReceiverGone;

impl std::fmt::Display for ReceiverGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the receiver of the stream went away")
    }
}

impl std::error::Error for ReceiverGone {}

/// Whether `err` comes from a write into a pipe whose reader went away.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Writing to stdout failed because its reader went away.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Runs a subcommand.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Send(a) => cmd_send(*a),
        Command::Receive(a) => cmd_receive(a),
        Command::Checksum(a) => cmd_checksum(a),
        Command::Dump(a) => print_out(|out| report::dump(a, out)),
        Command::Status(a) => print_out(|out| cmd_status(a, out)),
        Command::List(a) => print_out(|out| cmd_list(a, out)),
        Command::Verify(a) => replica::verify(a),
        Command::Prune(a) => print_out(|out| prune::prune(&a, out)),
        Command::Sync(a) => crate::sync::run(&a),
    }
}

/// Runs `f` with a buffered stdout, turning a broken pipe into [`StdoutClosed`].
fn print_out(f: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let mut out = BufWriter::new(io::stdout().lock());
    let result = f(&mut out).and_then(|()| out.flush().map_err(anyhow::Error::from));
    match result {
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Err(StdoutClosed.into())
        }
        other => other,
    }
}

/// Prints `line` and a newline on stdout (a closed stdout is no error of the command's).
pub(crate) fn print_line(line: &str) -> Result<()> {
    print_out(|out| writeln!(out, "{line}").map_err(anyhow::Error::from))
}

/// How `--force-share` opens images.
fn share(force_share: bool) -> OpenOptions {
    OpenOptions { force_share }
}

/// ` --state PATH` when the state was named on the command line, for hints to repeat it.
pub fn state_arg(state: Option<&Path>) -> String {
    state.map_or(String::new(), |p| format!(" --state {}", p.display()))
}

/// Worker threads: as asked (the CLI allows 1 to 32), else the cores up to 8. Memory grows
/// with the threads (about 4 MiB each while sending), never with the image.
fn threads(t: Option<u16>) -> usize {
    t.map_or_else(
        || std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
        usize::from,
    )
}

/// Send workers: as asked, else [`threads`], raised to what keeps `source` busy (an NBD
/// export wants reads in flight; the cap of 32 bounds memory as the CLI's does).
pub(crate) fn send_threads(
    t: Option<u16>,
    source: &dyn blkdelta_send::source::ChangeSource,
) -> usize {
    t.map_or_else(
        || threads(None).max(source.reads_in_flight().min(32)),
        usize::from,
    )
}

fn cmd_send(a: SendArgs) -> Result<()> {
    let usage_or = |e: SendError| match e {
        SendError::Usage(m) => anyhow::Error::new(UsageError(m)),
        other => anyhow::Error::new(other).context(format!("cannot send {}", what(&a))),
    };
    let opts = SourceOptions {
        open: share(a.force_share),
        from_name: a.from_name.clone(),
        to_name: a.to_name.clone(),
        bitmap: a.bitmap.clone(),
        allow_disabled: a.allow_disabled,
        since: a.since.clone(),
        changed_blocks: a.changed_blocks.clone(),
        era_block_bytes: a.era_block_size,
        compare_old: a.compare.clone(),
        against: a.against.clone(),
        direct: a.direct,
    };
    if a.vm.qmp.is_some() {
        return send_live(&a, usage_or);
    }
    if a.force_share {
        // Safe for internal snapshots QEMU leaves alone, never for a disk it writes.
        eprintln!(
            "note: --force-share reads an image a running QEMU may be writing: safe for its \
             internal snapshots, not for its active layer; 'send --qmp SOCKET --node NODE' \
             sends a running disk at a point in time"
        );
    }
    let spec = a.source.clone().unwrap_or_default();
    let mut source = open_source_opts(&spec, &opts).map_err(usage_or)?;
    if let Some(token) = &a.resume {
        let token = ResumeToken::parse(token).map_err(UsageError)?;
        source = Box::new(Resumed::new(source, &token).map_err(usage_or)?);
    }
    if a.dry_run {
        return print_out(|out| report::send_plan(source.as_ref(), out));
    }
    let started = std::time::Instant::now();
    let summary = stream_out(&a, source.as_ref())?;
    report_sent(&a, &summary, started);
    Ok(())
}

/// What `send` sends, for messages: SOURCE, or the node of `--qmp`.
fn what(a: &SendArgs) -> String {
    match (&a.source, &a.vm.node) {
        (Some(s), _) => s.clone(),
        (None, Some(node)) => format!("node {node}"),
        (None, None) => String::new(),
    }
}

/// `send --qmp SOCKET --node NODE`: a point-in-time view of the running disk, the stream, and
/// the view torn down (the bitmaps kept or dropped by how the stream ended).
fn send_live(a: &SendArgs, usage_or: impl Fn(SendError) -> anyhow::Error) -> Result<()> {
    for (given, option) in [
        (a.resume.is_some(), "--resume"),
        (a.bitmap.is_some(), "--bitmap"),
        (a.since.is_some(), "--since"),
        (a.changed_blocks.is_some(), "--changed-blocks"),
        (a.compare.is_some(), "--compare"),
        (a.against.is_some(), "--against"),
        (a.from_name.is_some(), "--from-name"),
        (a.direct, "--direct"),
    ] {
        if given {
            return Err(UsageError(format!(
                "{option} does not go with --qmp (the checkpoint finds its own base)"
            ))
            .into());
        }
    }
    let live =
        a.vm.live(a.from_bitmap.clone(), a.full, a.to_name.clone())
            .expect("send_live runs with --qmp");
    let cp = Checkpoint::begin(&live).map_err(&usage_or)?;
    let source = cp.source().map_err(&usage_or);
    let sent = match source {
        Ok(source) if a.dry_run => print_out(|out| report::send_plan(source.as_ref(), out)),
        Ok(source) => {
            let started = std::time::Instant::now();
            stream_out(a, source.as_ref()).map(|s| report_sent(a, &s, started))
        }
        Err(e) => Err(e),
    };
    // A dry run leaves the bitmaps as they were, as a failed stream does.
    let ended = cp.finish(sent.is_ok() && !a.dry_run);
    sent?;
    ended.map_err(usage_or)
}

/// Writes the stream of `source` to `-o FILE` or stdout.
fn stream_out(
    a: &SendArgs,
    source: &dyn blkdelta_send::source::ChangeSource,
) -> Result<SendSummary> {
    let opts = SendOptions {
        level: a.level,
        threads: send_threads(a.threads, source),
    };
    let progress = progress::make(a.progress, "send", false);
    let summary = match &a.output {
        Some(path) => {
            let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
            if regular && !a.force {
                return Err(UsageError(format!(
                    "{} exists: refusing to overwrite it (--force replaces it)",
                    path.display()
                ))
                .into());
            }
            let file =
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            let s = send_into(source, &opts, &file, a.bwlimit, progress.as_ref())?;
            // A stream file is synced; /dev/null or a FIFO cannot be, and need not be.
            let regular = file.metadata().is_ok_and(|m| m.is_file());
            if regular {
                file.sync_all()
                    .with_context(|| format!("cannot sync {}", path.display()))?;
            }
            s
        }
        None => {
            if io::stdout().is_terminal() {
                return Err(UsageError(
                    "refusing to write a stream to a terminal: redirect stdout or use -o FILE"
                        .into(),
                )
                .into());
            }
            enlarge_pipe(io::stdout());
            let out = io::stdout().lock();
            send_into(source, &opts, out, a.bwlimit, progress.as_ref()).map_err(|e| {
                let e = anyhow::Error::new(e);
                if is_broken_pipe(&e) {
                    anyhow::Error::new(ReceiverGone)
                } else {
                    e
                }
            })?
        }
    };
    Ok(summary)
}

/// Sends `source` into `out` through a 1 MiB buffer, paced to `bwlimit` bytes per second when
/// given. The pacing sits below the buffer, so that what reaches `out` comes in pieces of at
/// most the burst, not in a rush every megabyte.
fn send_into<W: Write>(
    source: &dyn blkdelta_send::source::ChangeSource,
    opts: &SendOptions,
    out: W,
    bwlimit: Option<u64>,
    progress: &dyn blkdelta_send::Progress,
) -> Result<SendSummary, SendError> {
    const BUFFER_BYTES: usize = 1 << 20;
    match bwlimit {
        Some(rate) => {
            let paced = Paced::new(out, rate);
            send(
                source,
                opts,
                BufWriter::with_capacity(BUFFER_BYTES, paced),
                progress,
            )
        }
        None => send(
            source,
            opts,
            BufWriter::with_capacity(BUFFER_BYTES, out),
            progress,
        ),
    }
}

/// The summary line of a send, unless quiet.
fn report_sent(a: &SendArgs, summary: &SendSummary, started: std::time::Instant) {
    if !a.progress.quiet {
        let what = format!(
            "sent {} of data in {} records, {} zeroed or discarded; stream {}",
            progress::human(summary.data_bytes),
            summary.data_records,
            progress::human(summary.zero_bytes),
            progress::human(summary.stream_bytes)
        );
        eprintln!(
            "{}",
            progress::summary(&what, summary.stream_bytes, started, "")
        );
    }
}

fn cmd_receive(a: ReceiveArgs) -> Result<()> {
    if a.cluster_size.is_some() {
        if a.format == Some(crate::cli::FormatArg::Raw) {
            return Err(UsageError(
                "--cluster-size is for a qcow2 replica, not with --format raw".into(),
            )
            .into());
        }
        if a.target.exists() {
            eprintln!(
                "note: --cluster-size is for a new qcow2 replica; {} exists and keeps its clusters",
                a.target.display()
            );
        }
    }
    let input: Box<dyn Read + Send> = match &a.input {
        Some(p) => Box::new(File::open(p).with_context(|| format!("cannot open {}", p.display()))?),
        None if io::stdin().is_terminal() => {
            return Err(UsageError(
                "refusing to read a stream from a terminal: pipe one in or use -i FILE".into(),
            )
            .into())
        }
        None => {
            enlarge_pipe(io::stdin());
            Box::new(io::stdin())
        }
    };
    // Bodies larger than the buffer are read straight into their own buffers, uncopied.
    let reader = StreamReader::new(BufReader::with_capacity(64 << 10, input))?;
    let is_dev = TargetProbe::of(&a.target)?.is_block_device;
    let state_path = a
        .state
        .clone()
        .unwrap_or_else(|| default_state_path(&a.target, is_dev));
    let overrides = if a.force {
        Overrides::all()
    } else {
        Overrides {
            rebase: a.rebase,
            overwrite: a.overwrite,
            rewind: a.rewind,
        }
    };
    let opts = ReceiveOptions {
        overrides,
        repair: a.repair,
        undo: a.undo.clone(),
        dry_run: a.dry_run,
        checkpoint_bytes: a.checkpoint_bytes,
        format: a.format.map(|f| match f {
            crate::cli::FormatArg::Qcow2 => ReplicaFormat::Qcow2,
            crate::cli::FormatArg::Raw => ReplicaFormat::Raw,
        }),
        cluster_bits: a.cluster_size.unwrap_or(0),
    };
    let from_pipe = a.input.is_none();
    let progress = progress::make(a.progress, "receive", from_pipe);
    let started = std::time::Instant::now();
    let result = receive_path(
        reader,
        &a.target,
        Some(&state_path),
        &opts,
        progress.as_ref(),
    );
    let held = state::load(&state_path).ok().flatten();
    match result {
        Ok(summary) if a.dry_run => print_out(|out| report::dry_receive(&summary, out)),
        Ok(summary) => {
            if summary.snapshots.is_empty() && !a.progress.quiet {
                // Never silent: a stream the replica is already past was verified, not applied.
                eprintln!(
                    "note: the replica already holds {}; the stream was verified and nothing \
                     was written",
                    held.as_ref().map(describe).unwrap_or_default()
                );
            } else if !a.progress.quiet {
                let what = format!(
                    "received {} of data, {} zeroed or discarded",
                    progress::human(summary.data_bytes),
                    progress::human(summary.zero_bytes),
                );
                let tail = format!(
                    "; replica holds {}",
                    held.as_ref().map(describe).unwrap_or_default()
                );
                eprintln!(
                    "{}",
                    progress::summary(&what, summary.data_bytes, started, &tail)
                );
            }
            Ok(())
        }
        Err(e)
            if held.is_some_and(|s| s.in_progress.is_some())
                && !matches!(e, ReceiveError::Refused { .. } | ReceiveError::Busy { .. }) =>
        {
            bail!(
                "{:#}; the replica is marked in progress: apply the same stream again, or resume \
             with the token 'blkdelta status {}{}' prints",
                anyhow::Error::new(e),
                a.target.display(),
                state_arg(a.state.as_deref())
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens `IMAGE[@SNAP]` as a block source.
fn open_image(
    spec: &str,
    state_path: Option<&Path>,
    options: &OpenOptions,
) -> Result<Arc<dyn BlockSource>> {
    let (path, snap) = if Path::new(spec).exists() {
        (Path::new(spec), None)
    } else if let Some((p, s)) = spec.rsplit_once('@') {
        (Path::new(p), Some(s))
    } else {
        (Path::new(spec), None)
    };
    match (probe_format(path)?, snap) {
        (Format::Qcow2, snap) => {
            let img = Qcow2Image::open_with(path, options)?;
            let layer = match snap {
                Some(s) => Layer::Snapshot(img.find_snapshot(s)?),
                None => Layer::Active,
            };
            Ok(Arc::new(img.layer(layer)?))
        }
        (Format::Raw, Some(_)) => bail!("{}: a raw image has no snapshots", path.display()),
        (Format::Raw, None) => {
            let mut raw = RawImage::open_with(path, options)?;
            if raw.is_block_device() {
                let sp = state_path
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| default_state_path(path, true));
                match state::load(&sp)? {
                    Some(st) => raw.limit_size(st.virtual_size),
                    None => eprintln!(
                        "note: {} has no blkdelta state (looked for {}): this is the digest of \
                         the whole device, {} bytes",
                        path.display(),
                        sp.display(),
                        raw.size()
                    ),
                }
            }
            Ok(Arc::new(raw))
        }
    }
}

fn cmd_checksum(a: ChecksumArgs) -> Result<()> {
    if replica::checksum(&a)?.is_some() {
        return Ok(());
    }
    let src = open_image(&a.image, a.state.as_deref(), &share(a.force_share))
        .with_context(|| format!("cannot checksum {}", a.image))?;
    print_digest_or_blocks(&a, src.as_ref())
}

/// Prints the digest of `src`, or with `--blocks` its block list.
fn print_digest_or_blocks(a: &ChecksumArgs, src: &dyn BlockSource) -> Result<()> {
    if a.blocks {
        return print_out(|out| {
            write_block_list(src, threads(a.threads), out)?;
            Ok(())
        });
    }
    let digest = image_digest(src, threads(a.threads))?;
    print_out(|out| replica::digest_line(&digest, &a.image, out))
}

fn cmd_status(a: StatusArgs, out: &mut dyn Write) -> Result<()> {
    let is_dev = TargetProbe::of(&a.target).is_ok_and(|t| t.is_block_device);
    let path = a
        .state
        .clone()
        .unwrap_or_else(|| default_state_path(&a.target, is_dev));
    let (st, probe) = blkdelta_receive::history::load_state(&a.target, &path)?;
    let Some(st) = st else {
        if a.json {
            // A machine asking what is there (sync, before a first seed) learns it on stdout.
            let target = match (probe.exists, probe.is_empty()) {
                (false, _) => "missing",
                (true, true) => "empty",
                (true, false) => "data",
            };
            writeln!(
                out,
                "{}",
                serde_json::json!({ "replica": "none", "target": target })
            )?;
        }
        bail!(
            "{} is not a blkdelta replica (no state at {})",
            a.target.display(),
            path.display()
        );
    };
    let health = st.health(probe.identity.as_ref());
    let history = match health {
        Health::Missing => Vec::new(),
        _ => blkdelta_receive::history::snapshots(&a.target, Some(&st))?,
    };
    report::status(&a, &st, &health, &history, &path, out)?;
    match health {
        Health::Unchanged => Ok(()),
        Health::Missing => bail!(
            "{}: the replica is missing; its state says it held {}",
            a.target.display(),
            state::describe(&st)
        ),
        Health::Changed(what) => bail!(
            "{}: the replica changed since blkdelta last wrote it: {what}",
            a.target.display()
        ),
    }
}

fn cmd_list(a: ListArgs, out: &mut dyn Write) -> Result<()> {
    let img = Qcow2Image::open_with(&a.image, &share(a.force_share))
        .with_context(|| format!("cannot list {}", a.image.display()))?;
    report::list(&img, a.json, out)
}

/// Grows the pipe on `fd`, if it is one, to 1 MiB (a whole data record), so that sender and
/// receiver trade records with fewer wake-ups. Best effort: the limit may be lower.
fn enlarge_pipe(fd: impl std::os::fd::AsFd) {
    let is_pipe = rustix::fs::fstat(&fd).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo
    });
    if is_pipe {
        let _ = rustix::pipe::fcntl_setpipe_size(&fd, 1 << 20);
    }
}

/// Reads a stream for `dump`.
fn open_stream(file: Option<&Path>) -> Result<StreamReader<Box<dyn Read>>> {
    let input: Box<dyn Read> = match file {
        Some(p) => Box::new(BufReader::new(
            File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        )),
        None if io::stdin().is_terminal() => {
            return Err(UsageError(
                "refusing to read a stream from a terminal: pipe one in or name a FILE".into(),
            )
            .into())
        }
        None => Box::new(BufReader::new(io::stdin().lock())),
    };
    Ok(StreamReader::new(input)?)
}

/// Verifies a data record's payload (used by dump so a corrupt stream never dumps cleanly).
fn verify(rec: &Record, at: u64) -> Result<()> {
    if let Record::Data(d) = rec {
        d.plain(at)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkdelta_common::image::Allocation;
    use blkdelta_common::stream::{SnapRef, SourceInfo};
    use blkdelta_send::source::FullSource;

    /// A source that wants `.0` reads in flight.
    struct Wants(usize);

    impl BlockSource for Wants {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<(), blkdelta_common::ImageError> {
            buf.fill(0);
            Ok(())
        }
        fn status(
            &self,
            _offset: u64,
            max_len: u64,
        ) -> Result<(Allocation, u64), blkdelta_common::ImageError> {
            Ok((Allocation::Data, max_len.min(self.size())))
        }
        fn reads_in_flight(&self) -> usize {
            self.0
        }
    }

    fn source(wants: usize) -> FullSource {
        let info = SourceInfo {
            kind: "raw".into(),
            name: "t".into(),
        };
        FullSource::new(Arc::new(Wants(wants)), info, SnapRef::named("t"))
    }

    #[test]
    fn a_send_runs_as_many_workers_as_its_source_wants_unless_told() {
        let cores = threads(None);
        assert_eq!(send_threads(None, &source(0)), cores);
        assert_eq!(send_threads(None, &source(8)), cores.max(8));
        assert_eq!(send_threads(None, &source(1000)), cores.max(32), "capped");
        assert_eq!(send_threads(Some(3), &source(8)), 3, "--threads wins");
    }

    #[test]
    fn a_file_source_is_read_with_sixteen_reads_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
        let raw = FullSource::raw(&path).unwrap();
        assert_eq!(
            send_threads(None, &raw),
            threads(None).max(blkdelta_common::image::FILE_READS_IN_FLIGHT)
        );
    }
}
