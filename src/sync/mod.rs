//! `blkdelta sync`: one replication cycle, what syncoid is to `zfs send`.
//!
//! ```text
//! lock source and target ─► status --json TARGET ─► list --json SOURCE ─► plan (plan.rs)
//!   ─► qemu-img snapshot -c blkdelta-<UTC> SOURCE   (--qmp: the checkpoint of send --qmp)
//!   ─► [qemu-img snapshot -a BASE TARGET]            (the replica holds a state the source lost)
//!   ─► send BASE..NEW (in this process, or ssh HOST blkdelta send) │ blkdelta receive TARGET
//!   ─► qemu-img snapshot -d on the source (--keep-source) ─► blkdelta prune TARGET (--keep)
//! ```
//!
//! Orchestration only: the receiving side is a `blkdelta receive` process (local, or through
//! ssh), so send and receive meet only in the stream and in `status --json`. Every step can be
//! killed: the source keeps a snapshot the next cycle skips or prunes, the replica stays as
//! receive leaves it (at a snapshot, or in progress with its resume point, which the next
//! cycle finishes first).

mod lock;
mod plan;
mod registry;
mod side;

use std::io::{self, BufWriter, Write};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use blkdelta_common::stream::ResumeToken;
use blkdelta_send::pace::Paced;
use blkdelta_send::pipeline::{plan_totals, send, SendOptions};
use blkdelta_send::source::live::Checkpoint;
use blkdelta_send::source::{
    open_source_opts, ChangeSource, Qcow2Snapshots, Resumed, SnapshotSpec, SourceOptions,
};
use blkdelta_send::NoProgress;
use serde_json::{json, Value};

use crate::cli::SyncArgs;
use crate::progress::human;
use crate::UsageError;
use plan::{SourceSnap, Start, Target};
use side::{Location, Side, Ssh, StderrTail};

/// The names of the snapshots sync makes, and the only ones it deletes.
pub const PREFIX: &str = "blkdelta-";

/// For the tests of a cycle killed at each step: `BLKDELTA_SYNC_KILL_AT=STEP` kills the
/// process with SIGKILL when the cycle reaches `STEP` (`snapshot`: before the source's snapshot
/// is made; `stream`: after it, before the stream; `prune`: after the stream, before pruning).
fn kill_point(step: &str) {
    if std::env::var_os("BLKDELTA_SYNC_KILL_AT").is_some_and(|v| v == step) {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

/// What a cycle did (or, in a dry run, would do).
#[derive(Debug, Default)]
struct Outcome {
    /// `seed`, `incremental` or `repair`.
    kind: &'static str,
    from: Option<String>,
    to: String,
    bytes: u64,
    seconds: f64,
    /// In a dry run, the data bytes the stream would carry at most (when the source is here).
    estimate: Option<u64>,
    /// An interrupted apply finished first: its target state.
    finished: Option<String>,
    /// The replica snapshot reverted to before the stream.
    reverted: Option<String>,
    pruned_source: Vec<String>,
    pruned_replica: Vec<String>,
}

/// The ends as the command line names them: the source (none with --qmp) and the target.
fn ends(a: &SyncArgs) -> Result<(Option<Location>, Location)> {
    let usage = |m: &str| anyhow!(UsageError(m.to_string()));
    let (source, target) = match (a.vm.qmp.is_some(), a.ends.as_slice()) {
        (true, [t]) => (None, Location::parse(t)),
        (true, _) => return Err(usage("with --qmp, name only TARGET (the disk is --node)")),
        (false, [s, t]) => (Some(Location::parse(s)), Location::parse(t)),
        (false, _) => return Err(usage("sync needs SOURCE and TARGET (or --qmp and TARGET)")),
    };
    if source.as_ref().is_some_and(|s| s.host().is_some()) && target.host().is_some() {
        return Err(usage(
            "SOURCE and TARGET are both remote: run sync on one of the two hosts",
        ));
    }
    if a.vm.qmp.is_some() && a.repair {
        return Err(usage(
            "--repair reads a qcow2 SOURCE's snapshot: it does not go with --qmp",
        ));
    }
    if a.repair && source.as_ref().is_some_and(|s| s.host().is_some()) {
        return Err(usage(
            "--repair needs the source on this machine: run sync on the source's host",
        ));
    }
    Ok((source, target))
}

/// Whether a --keep rule prunes the replica.
fn prunes_replica(a: &SyncArgs) -> bool {
    a.keep.is_some() || a.keep_daily.is_some() || a.keep_weekly.is_some()
}

/// `blkdelta sync`.
pub fn run(a: &SyncArgs) -> Result<()> {
    let started = Instant::now();
    side::VERBOSE.store(a.verbose, std::sync::atomic::Ordering::Relaxed);
    let (source, target) = ends(a)?;
    let what = match &source {
        Some(s) => s.to_string(),
        None => format!("node {}", a.vm.node.as_deref().unwrap_or_default()),
    };
    let key = |loc: &Location| match loc {
        Location::Local(p) => lock::local_key(p),
        Location::Remote { host, path } => format!("{host}:{path}"),
    };
    let source_key = match (&source, &a.vm.qmp) {
        (Some(s), _) => key(s),
        (None, Some(q)) => format!(
            "qmp:{}#{}",
            lock::local_key(q),
            a.vm.node.as_deref().unwrap_or("")
        ),
        (None, None) => unreachable!("ends() refuses that"),
    };
    let target_key = key(&target);
    if source_key == target_key {
        return Err(anyhow!(UsageError(format!(
            "SOURCE and TARGET are the same file ({target})"
        ))));
    }
    // One namespace for both ends: `sync A B` and `sync B C` exclude each other too.
    let _locks = lock::take(
        &[
            (what.clone(), source_key),
            (target.to_string(), target_key.clone()),
        ],
        a.wait,
    )?;
    let mut ssh = Ssh::new(&a.ssh_command, &a.remote_blkdelta)?;
    for host in source.iter().chain([&target]).filter_map(Location::host) {
        ssh.use_host(host);
    }
    let tside = Side::of(&target, &ssh);
    let status = target_status(&tside, &target)?;
    if prunes_replica(a) {
        let raw = match &status {
            Target::Replica(r) => !r.qcow2,
            Target::None(_) => !target.path().ends_with(".qcow2"),
        };
        if raw {
            return Err(anyhow!(UsageError(format!(
                "--keep, --keep-daily and --keep-weekly prune a qcow2 replica; {target} keeps \
                 no history"
            ))));
        }
    }
    let mut outcome = match &source {
        Some(src) => offline(a, src, (&target, &target_key), &ssh, &status)?,
        None => live(a, &target, &tside, &status)?,
    };
    outcome.seconds = started.elapsed().as_secs_f64();
    report(a, &what, &target, &outcome)
}

/// What the target holds, from `status --json` on its side.
fn target_status(tside: &Side, target: &Location) -> Result<Target> {
    let out = tside.output(tside.blkdelta(&["status", "--json", &target.path()])?)?;
    let parsed = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| plan::target(&v));
    match parsed {
        Some(t) => Ok(t),
        None => Err(tside.failure("asking what the replica holds", &out)),
    }
}

/// The source's snapshots, from `list --json` on its side.
fn source_snapshots(sside: &Side, source: &Location) -> Result<Vec<SourceSnap>> {
    let out = sside.output(sside.blkdelta(&["list", "--json", &source.path()])?)?;
    if !out.status.success() {
        if String::from_utf8_lossy(&out.stderr).contains("in use by a writer") {
            // `list` names --force-share; a cycle must not snapshot a disk a VM writes.
            return Err(anyhow!(
                "{source} is in use by a writer (a running VM?): sync it through QEMU with \
                 --qmp SOCKET --node NODE"
            ));
        }
        return Err(sside.failure("listing the source's snapshots", &out));
    }
    let out = out.stdout;
    serde_json::from_slice::<Value>(&out)
        .ok()
        .and_then(|v| plan::source_snapshots(&v))
        .ok_or_else(|| anyhow!("{source}: list --json printed something else than a list"))
}

/// The snapshot names a new one must not take: the source's, and the replica's (a name the
/// replica keeps, reused, would make a revert to it ambiguous).
fn taken(source: &[SourceSnap], status: &Target) -> Vec<String> {
    let mut names: Vec<String> = source.iter().map(|s| s.name.clone()).collect();
    if let Target::Replica(r) = status {
        names.extend(r.snapshots.iter().map(|s| s.name.clone()));
        names.extend(r.held.iter().map(|h| h.name.clone()));
    }
    names
}

/// `blkdelta-YYYYMMDDTHHMMSSZ` now, made unique among `taken`.
fn new_name(taken: &[String]) -> String {
    let stamp: String = blkdelta_common::time::utc_stamp(blkdelta_common::time::now_secs())
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let base = format!("{PREFIX}{stamp}");
    let free = |n: &String| !taken.contains(n);
    std::iter::once(base.clone())
        .chain((2..).map(|k| format!("{base}-{k}")))
        .find(free)
        .expect("some name is free")
}

/// The cycle of a qcow2 image at rest (here or on another host).
/// `target` is the replica and the key that names it among the source's replicas.
fn offline(
    a: &SyncArgs,
    src: &Location,
    (target, target_key): (&Location, &str),
    ssh: &Ssh,
    status: &Target,
) -> Result<Outcome> {
    let sside = Side::of(src, ssh);
    let tside = Side::of(target, ssh);
    let mut outcome = Outcome::default();
    let mut status = status.clone();
    let mut snaps = source_snapshots(&sside, src)?;
    let mut start = plan::start(&snaps, &status, a.rewind);
    if let Ok(Start::Finish { from, to, token }) = &start {
        // The last cycle was cut short mid-stream: its stream is sent again, from where the
        // receiver kept its resume point, before this cycle's.
        if a.dry_run {
            outcome.finished = Some(to.clone());
        } else {
            let spec = match from {
                Some(f) => format!("{}@{f}..{to}", src.path()),
                None => format!("{}@{to}", src.path()),
            };
            let into = Receiving {
                target,
                side: &tside,
                flags: &[],
                prune: false,
            };
            outcome.bytes += transfer(a, src, &spec, (token.as_deref(), None), &into)?.bytes;
            outcome.finished = Some(to.clone());
            status = target_status(&tside, target)?;
            snaps = source_snapshots(&sside, src)?;
            start = plan::start(&snaps, &status, a.rewind);
        }
    }
    let start = match start {
        Ok(s) => Some(s),
        Err(_) if a.repair => None,
        Err(e) => bail!("{target}: {}", e.0),
    };
    let new = new_name(&taken(&snaps, &status));
    let (kind, from, revert) = match &start {
        None => ("repair", None, None),
        Some(Start::Seed) => ("seed", None, None),
        Some(Start::From { base, revert }) => ("incremental", Some(base.clone()), revert.clone()),
        Some(Start::Finish { to, .. }) => ("incremental", Some(to.clone()), None),
    };
    outcome.kind = kind;
    outcome.from = from.clone();
    outcome.to = new.clone();
    outcome.reverted = revert.clone();
    if a.dry_run {
        let mut after = snaps.clone();
        after.push(SourceSnap {
            name: new.clone(),
            guid: String::new(),
        });
        let mut protected = registry::others(&registry::read(&sside, src), target_key);
        protected.push(new.clone());
        outcome.pruned_source = plan::source_prune(&after, a.keep_source, &protected);
        outcome.pruned_replica = replica_prune_plan(a, &status, &new);
        outcome.estimate = match src {
            Location::Local(p) => Some(planned_bytes(p, from.as_deref())?),
            Location::Remote { .. } => None,
        };
        return Ok(outcome);
    }
    let path = src.path();
    kill_point("snapshot");
    sside.run(
        sside.tool("qemu-img", &["snapshot", "-c", &new, &path]),
        &format!("creating snapshot {new}"),
    )?;
    kill_point("stream");
    if let Some(r) = &revert {
        tside.run(
            tside.tool("qemu-img", &["snapshot", "-a", r, &target.path()]),
            &format!("reverting the replica to its snapshot {r}"),
        )?;
    }
    let (spec, receive_flags): (String, Vec<&str>) = match (&start, &from) {
        (None, _) => (format!("{path}@{new}"), vec!["--repair"]),
        // --rewind replaces a replica, or (a seed needs --overwrite then) data of another kind.
        (Some(Start::Seed), _) if a.rewind => {
            let flag = match &status {
                Target::None(_) => "--overwrite",
                Target::Replica(_) => "--rewind",
            };
            (format!("{path}@{new}"), vec![flag])
        }
        (_, None) => (format!("{path}@{new}"), vec![]),
        // Reverted by QEMU to the base just now: the replica's state may still name another
        // snapshot of the same content (a cycle without writes), which receive would hold to.
        (_, Some(f)) if revert.is_some() => (format!("{path}@{f}..{new}"), vec!["--rebase"]),
        (_, Some(f)) => (format!("{path}@{f}..{new}"), vec![]),
    };
    let blocks = match start {
        None => Some(block_list(&tside, target)?),
        Some(_) => None,
    };
    let into = Receiving {
        target,
        side: &tside,
        flags: &receive_flags,
        prune: true,
    };
    let sent = transfer(
        a,
        src,
        &spec,
        (None, blocks.as_ref().map(|b| b.path())),
        &into,
    );
    let pruned_there = match sent {
        Ok(streamed) => {
            outcome.bytes += streamed.bytes;
            streamed.pruned
        }
        Err(e) => {
            forget_new(&sside, &tside, target, &path, &new);
            return Err(e);
        }
    };
    kill_point("prune");
    // The replica holds `new` now: older blkdelta snapshots of the source may go.
    snaps.push(SourceSnap {
        name: new.clone(),
        guid: String::new(),
    });
    let holders = registry::read(&sside, src);
    let mut protected = registry::others(&holders, target_key);
    protected.push(new.clone());
    let pruned = plan::source_prune(&snaps, a.keep_source, &protected);
    snaps.retain(|s| !pruned.contains(&s.name));
    registry::record(&sside, src, holders, &snaps, target_key, &new)?;
    for old in pruned {
        sside.run(
            sside.tool("qemu-img", &["snapshot", "-d", &old, &path]),
            &format!("deleting the source's snapshot {old}"),
        )?;
        outcome.pruned_source.push(old);
    }
    outcome.pruned_replica = prune_replica(a, &tside, target, pruned_there)?;
    Ok(outcome)
}

/// After a failed stream: deletes the cycle's snapshot from the source, unless the replica is
/// part way to it (the next cycle finishes that stream from its resume point). Best effort:
/// a snapshot left behind is pruned by a later cycle.
fn forget_new(sside: &Side, tside: &Side, target: &Location, path: &str, new: &str) {
    let part_way = match target_status(tside, target) {
        Ok(Target::Replica(r)) => r.in_progress.is_some_and(|(_, to)| to.name == new),
        Ok(Target::None(_)) => false,
        Err(_) => true,
    };
    if !part_way {
        let _ = sside.run(
            sside.tool("qemu-img", &["snapshot", "-d", new, path]),
            "deleting the failed cycle's snapshot",
        );
    }
}

/// The data bytes a stream from snapshot `from` (none: a seed) to a snapshot of the active
/// layer taken now would carry at most, from the image's tables alone.
fn planned_bytes(path: &std::path::Path, from: Option<&str>) -> Result<u64> {
    let spec = match from {
        Some(f) => SnapshotSpec::ToActive { from: f.into() },
        None => SnapshotSpec::Active,
    };
    let source = Qcow2Snapshots::open(path, &spec)
        .with_context(|| format!("cannot plan a stream of {}", path.display()))?;
    Ok(plan_totals(&source)?.data_bytes)
}

/// The replica's block list (`checksum --blocks` on its side), in a temporary file, for a
/// repair stream.
fn block_list(tside: &Side, target: &Location) -> Result<tempfile::NamedTempFile> {
    let file = tempfile::NamedTempFile::new().context("cannot create a temporary file")?;
    let out = file
        .reopen()
        .context("cannot open the temporary file for the block list")?;
    tside.run_into(
        tside.blkdelta(&["checksum", "--blocks", &target.path()])?,
        out,
        "listing the replica's block hashes",
    )?;
    Ok(file)
}

/// The --keep rules of `a`, for the replica's `blkdelta-` snapshots.
fn keep_rules(a: &SyncArgs) -> blkdelta_receive::prune::PruneRules {
    blkdelta_receive::prune::PruneRules {
        keep: a.keep.unwrap_or(0),
        keep_daily: a.keep_daily.unwrap_or(0),
        keep_weekly: a.keep_weekly.unwrap_or(0),
        prefix: Some(PREFIX.into()),
    }
}

/// What the --keep rules would delete from the replica once it holds `new`.
fn replica_prune_plan(a: &SyncArgs, status: &Target, new: &str) -> Vec<String> {
    match status {
        Target::Replica(r) if prunes_replica(a) => {
            let now = u32::try_from(blkdelta_common::time::now_secs()).unwrap_or(u32::MAX);
            plan::replica_prune(&r.snapshots, new, now, &keep_rules(a))
        }
        _ => Vec::new(),
    }
}

/// `prune --json --prefix blkdelta- RULES TARGET`: the replica's pruning by the --keep rules.
fn prune_args(a: &SyncArgs, target: &Location) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "prune".into(),
        "--json".into(),
        "--prefix".into(),
        PREFIX.into(),
    ];
    for (flag, v) in [
        ("--keep", a.keep),
        ("--keep-daily", a.keep_daily),
        ("--keep-weekly", a.keep_weekly),
    ] {
        if let Some(n) = v {
            args.push(flag.into());
            args.push(n.to_string());
        }
    }
    args.push(target.path());
    args
}

/// The names `prune --json` says it deleted.
fn pruned(out: &[u8]) -> Result<Vec<String>> {
    let v: Value = serde_json::from_slice(out).context("prune --json printed no JSON")?;
    Ok(v.get("deleted")
        .and_then(Value::as_array)
        .map(|d| {
            d.iter()
                .filter_map(|s| s.get("name").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Prunes the replica with the --keep rules (its `blkdelta-` snapshots only), unless the
/// receiving session did (`done`); the names deleted.
fn prune_replica(
    a: &SyncArgs,
    tside: &Side,
    target: &Location,
    done: Option<Vec<String>>,
) -> Result<Vec<String>> {
    if let Some(names) = done {
        return Ok(names);
    }
    if !prunes_replica(a) {
        return Ok(Vec::new());
    }
    let args = prune_args(a, target);
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    pruned(&tside.run(tside.blkdelta(&words)?, "pruning the replica")?)
}

/// The cycle of a running QEMU's disk: the checkpoint of `send --qmp`, whose old bitmap goes
/// only once the replica has received the stream.
fn live(a: &SyncArgs, target: &Location, tside: &Side, status: &Target) -> Result<Outcome> {
    let bitmap = |s: &plan::State| format!("{PREFIX}{}", s.guid);
    // (base bitmap, whole disk, receive flags)
    let (from_bitmap, full, flags): (Option<String>, bool, Vec<&str>) = match status {
        Target::None(what) if what == "data" && !a.rewind => {
            bail!(
                "{target}: the target holds data that is not a blkdelta replica; {}",
                plan::WAY_OUT
            )
        }
        Target::None(what) if what == "data" => (None, true, vec!["--overwrite"]),
        Target::None(_) => (None, true, vec![]),
        Target::Replica(_) if a.rewind => (None, true, vec!["--rewind"]),
        Target::Replica(r) => match (&r.in_progress, &r.held, &r.changed) {
            // Cut short: the old bitmap (merged with the one of the cut stream) covers every
            // range that stream wrote, so a stream from it is right over what was written.
            (Some((Some(f), _)), _, _) => (Some(bitmap(f)), false, vec!["--rebase"]),
            (Some((None, _)), _, _) => (None, true, vec!["--rewind"]),
            (None, _, Some(changed)) => bail!(
                "{target}: the replica changed since blkdelta last wrote it ({changed}); {}",
                plan::WAY_OUT
            ),
            (None, Some(h), None) => (Some(bitmap(h)), false, vec![]),
            (None, None, None) => bail!("{target}: the replica holds no state; {}", plan::WAY_OUT),
        },
    };
    let node = a.vm.node.clone().unwrap_or_default();
    let new = new_name(&taken(&[], status));
    // What the replica holds, by the name the previous cycle gave it.
    let from_name = match status {
        Target::Replica(r) if !full => match &r.in_progress {
            Some((f, _)) => f.as_ref().map(|f| f.name.clone()),
            None => r.held.as_ref().map(|h| h.name.clone()),
        },
        _ => None,
    };
    let mut outcome = Outcome {
        kind: if full { "seed" } else { "incremental" },
        from: from_name,
        to: new.clone(),
        ..Outcome::default()
    };
    if a.dry_run {
        outcome.pruned_replica = replica_prune_plan(a, status, &outcome.to);
        return Ok(outcome);
    }
    kill_point("snapshot");
    let opts =
        a.vm.live(from_bitmap.clone(), full, Some(new))
            .expect("live() runs with --qmp");
    let cp = Checkpoint::begin(&opts).map_err(|e| match &from_bitmap {
        Some(b) => anyhow!(
            "node {node}: {e} (the replica holds the state of bitmap {b}; {})",
            plan::WAY_OUT
        ),
        None => anyhow!("node {node}: {e}"),
    })?;
    let source = cp.source();
    let into = Receiving {
        target,
        side: tside,
        flags: &flags,
        prune: true,
    };
    let sent = match source {
        Ok(source) => stream_to(a, Sender::Here(source.as_ref()), &into),
        Err(e) => Err(e.into()),
    };
    // The old bitmap goes only when the replica took the whole stream.
    let ended = cp.finish(sent.is_ok());
    let streamed = sent?;
    outcome.bytes = streamed.bytes;
    ended?;
    kill_point("prune");
    outcome.pruned_replica = prune_replica(a, tside, target, streamed.pruned)?;
    Ok(outcome)
}

/// Where the stream comes from.
enum Sender<'a> {
    /// This process, from a change source.
    Here(&'a dyn ChangeSource),
    /// `blkdelta send` on the source's host (pull mode).
    There(Box<std::process::Command>, Side<'a>),
}

/// Sends `spec` of `src` (resumed at `token`; against the block list `against`) `into` the
/// receiver.
fn transfer(
    a: &SyncArgs,
    src: &Location,
    spec: &str,
    (token, against): (Option<&str>, Option<&std::path::Path>),
    into: &Receiving,
) -> Result<Streamed> {
    if let Some(host) = src.host() {
        // Pull: the source's host sends; this one relays to the receiver.
        let mut args = vec!["send", "-q", "-l"];
        let level = a.level.to_string();
        args.push(&level);
        if let Some(t) = token {
            args.extend(["--resume", t]);
        }
        let rate = a.bwlimit.map(|r| r.to_string());
        if let Some(r) = &rate {
            args.extend(["--bwlimit", r]);
        }
        if direct(a, spec) {
            args.push("--direct");
        }
        args.push(spec);
        let sside = into.side.on(host);
        let cmd = sside.blkdelta(&args)?;
        return stream_to(a, Sender::There(Box::new(cmd), sside), into);
    }
    let opts = SourceOptions {
        against: against.map(std::path::Path::to_path_buf),
        direct: direct(a, spec),
        ..SourceOptions::default()
    };
    let mut source =
        open_source_opts(spec, &opts).with_context(|| format!("cannot send {spec}"))?;
    if let Some(t) = token {
        let t = ResumeToken::parse(t).map_err(|e| anyhow!("the replica's resume token: {e}"))?;
        source =
            Box::new(Resumed::new(source, &t).with_context(|| format!("cannot resume {spec}"))?);
    }
    stream_to(a, Sender::Here(source.as_ref()), into)
}

/// Whether the stream of `spec` goes straight from its base to the new snapshot: an
/// incremental (`@FROM..TO`) without --all.
fn direct(a: &SyncArgs, spec: &str) -> bool {
    !a.all
        && spec
            .rsplit_once('@')
            .is_some_and(|(_, snaps)| snaps.contains(".."))
}

/// Counts the bytes written through it.
struct Counted<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a stream did: its bytes, and the replica snapshots pruned in the same session.
struct Streamed {
    bytes: u64,
    pruned: Option<Vec<String>>,
}

/// The receiving end of a stream.
struct Receiving<'a> {
    target: &'a Location,
    side: &'a Side<'a>,
    /// `receive` switches.
    flags: &'a [&'a str],
    /// Prune the replica by the --keep rules once it received the stream: on a remote side,
    /// in the same ssh session (one round trip less).
    prune: bool,
}

/// Runs `blkdelta receive FLAGS TARGET` on the target's side and feeds it the stream of
/// `sender`. When the receiver fails, its error is the one reported.
fn stream_to(a: &SyncArgs, sender: Sender, into: &Receiving) -> Result<Streamed> {
    let (target, tside) = (into.target, into.side);
    let path = target.path();
    let mut args = vec!["receive", "-q"];
    args.extend_from_slice(into.flags);
    args.push(&path);
    let prune = prune_args(a, target);
    let prune_words: Vec<&str> = prune.iter().map(String::as_str).collect();
    let then = (into.prune && prunes_replica(a))
        .then(|| tside.blkdelta_then(&args, &prune_words))
        .flatten();
    let pruning = then.is_some();
    let mut receiver = match then {
        Some(cmd) => cmd,
        None => tside.blkdelta(&args)?,
    }
    .stdin(Stdio::piped())
    .stdout(if pruning {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stderr(Stdio::piped())
    .spawn()
    .context("cannot start the receiver")?;
    let tail = StderrTail::of(&mut receiver);
    let printed = StderrTail::reading(receiver.stdout.take());
    let stdin = receiver.stdin.take().expect("piped");
    // Paced below the buffer, as send paces: the stream leaves in small, even pieces. A
    // remote sender paces itself.
    let paced: Box<dyn Write> = match (a.bwlimit, &sender) {
        (Some(rate), Sender::Here(_)) => Box::new(Paced::new(stdin, rate)),
        _ => Box::new(stdin),
    };
    let mut out = Counted {
        inner: BufWriter::with_capacity(1 << 20, paced),
        bytes: 0,
    };
    let streaming = Instant::now();
    let sent: Result<()> = match sender {
        Sender::Here(source) => {
            let opts = SendOptions {
                level: a.level,
                threads: crate::commands::send_threads(None, source),
            };
            send(source, &opts, &mut out, &NoProgress)
                .map(|_| ())
                .map_err(anyhow::Error::from)
                .and_then(|()| out.flush().map_err(anyhow::Error::from))
        }
        Sender::There(mut cmd, sside) => relay(&mut cmd, &sside, &mut out),
    };
    let bytes = out.bytes;
    drop(out);
    let status = receiver.wait().context("cannot wait for the receiver")?;
    side::trace(
        &format!("the stream into {target}, {bytes} bytes"),
        streaming,
    );
    let said = tail.take();
    if pruning && status.code() == Some(side::THEN_FAILED) {
        return Err(tside.failed("pruning the replica", None, &said));
    }
    if !status.success() {
        return Err(tside.failed("receiving", status.code(), &said));
    }
    sent?;
    let pruned = match pruning {
        true => Some(pruned(&printed.take())?),
        false => None,
    };
    Ok(Streamed { bytes, pruned })
}

/// Runs the remote sender and copies its stream into `out`.
fn relay(cmd: &mut std::process::Command, sside: &Side, out: &mut impl Write) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the sender")?;
    let tail = StderrTail::of(&mut child);
    let mut stream = child.stdout.take().expect("piped");
    let copied = io::copy(&mut stream, out).and_then(|_| out.flush());
    drop(stream);
    let status = child.wait().context("cannot wait for the sender")?;
    let said = tail.take();
    if !status.success() {
        return Err(sside.failed("sending", status.code(), &said));
    }
    copied.context("cannot pass the stream on to the receiver")?;
    Ok(())
}

/// The summary line (or the JSON object, or nothing when quiet).
fn report(a: &SyncArgs, what: &str, target: &Location, o: &Outcome) -> Result<()> {
    let range = match &o.from {
        Some(f) => format!("{f}..{}", o.to),
        None => o.to.clone(),
    };
    if a.json {
        let v = json!({
            "source": what,
            "target": target.to_string(),
            "dry_run": a.dry_run,
            "kind": o.kind,
            "from": o.from,
            "to": o.to,
            "finished": o.finished,
            "reverted_to": o.reverted,
            "bytes": o.bytes,
            "planned_data_bytes": o.estimate,
            "seconds": (o.seconds * 1000.0).round() / 1000.0,
            "bytes_per_second": if o.seconds > 0.0 { (o.bytes as f64 / o.seconds) as u64 } else { 0 },
            "pruned_source": o.pruned_source,
            "pruned_replica": o.pruned_replica,
        });
        return crate::commands::print_line(&v.to_string());
    }
    if a.quiet {
        return Ok(());
    }
    let mut extra = String::new();
    if let Some(f) = &o.finished {
        let verb = if a.dry_run {
            "would finish"
        } else {
            "finished"
        };
        extra += &format!("; {verb} the interrupted stream to {f} first");
    }
    if let Some(r) = &o.reverted {
        let verb = if a.dry_run {
            "would revert"
        } else {
            "reverted"
        };
        extra += &format!("; {verb} the replica to {r} first");
    }
    let line = if a.dry_run {
        let snapshot = match a.vm.qmp {
            Some(_) => format!("checkpoint {}", o.to),
            None => format!("snapshot {}", o.to),
        };
        format!(
            "dry run: {what} -> {target}: would create {snapshot}, send {} {range}{}{extra}; \
             would delete {} on the source, {} on the replica",
            o.kind,
            o.estimate.map_or(String::new(), |b| format!(
                " ({} of data at most)",
                human(b)
            )),
            list(&o.pruned_source),
            list(&o.pruned_replica),
        )
    } else {
        let rate = if o.seconds > 0.0 {
            o.bytes as f64 / o.seconds
        } else {
            0.0
        };
        format!(
            "{what} -> {target}: {} {range}, {} in {:.1} s ({}/s){extra}; pruned {} on the \
             source, {} on the replica",
            o.kind,
            human(o.bytes),
            o.seconds,
            human(rate as u64),
            list(&o.pruned_source),
            list(&o.pruned_replica),
        )
    };
    crate::commands::print_line(&line)
}

/// `nothing`, or the names joined.
fn list(names: &[String]) -> String {
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}
