//! `blkdelta prune`: the retention rules from the command line, and what was deleted (or
//! would be) as text or JSON.

use std::io::Write;

use anyhow::Result;
use blkdelta_common::image::qcow2::Snapshot;
use blkdelta_receive::prune::{self, PruneReport, PruneRules};
use serde_json::{json, Value};

use super::report::utc_date;
use crate::cli::PruneArgs;

/// `blkdelta prune TARGET --keep N`.
pub fn prune(a: &PruneArgs, out: &mut dyn Write) -> Result<()> {
    let rules = PruneRules {
        keep: a.keep.unwrap_or(0),
        keep_daily: a.keep_daily.unwrap_or(0),
        keep_weekly: a.keep_weekly.unwrap_or(0),
        prefix: a.prefix.clone(),
    };
    let report = prune::prune(&a.target, a.state.as_deref(), &rules, a.dry_run)?;
    if a.json {
        writeln!(out, "{}", report_json(&report))?;
        return Ok(());
    }
    // Quiet, as for schedulers: nothing unless something fails.
    if !a.quiet {
        write_lines(&report, out)?;
        writeln!(out, "{}", summary(&report))?;
    }
    Ok(())
}

/// `NAME (id ID, DATE UTC)`.
fn describe(s: &Snapshot) -> String {
    format!(
        "{} (id {}, {} UTC)",
        s.name,
        s.id,
        utc_date(u64::from(s.date_sec))
    )
}

/// One line per deleted snapshot; in a dry run, one per snapshot, in table order.
fn write_lines(report: &PruneReport, out: &mut dyn Write) -> Result<()> {
    for (s, deleted) in report.fates() {
        let line = match (report.dry_run, deleted) {
            (false, true) => format!("deleted {}", describe(s)),
            (false, false) => continue,
            (true, true) => format!("would delete {}", describe(s)),
            (true, false) if report.held() == Some(s) => {
                format!("would keep {}, held by the replica", describe(s))
            }
            (true, false) => format!("would keep {}", describe(s)),
        };
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// `kept K, deleted D, freed ~X MiB; the replica holds NAME`.
fn summary(report: &PruneReport) -> String {
    let held = match report.held() {
        Some(s) => format!("the replica holds {}", s.name),
        None => "the replica holds none of its snapshots (its active layer differs from each), \
                 so the rules alone decided"
            .to_string(),
    };
    let (kept, deleted) = (report.kept().count(), report.deleted.len());
    if report.dry_run {
        return format!("would keep {kept}, delete {deleted}; {held} (dry run: nothing changed)");
    }
    let mib = report.freed_bytes as f64 / f64::from(1u32 << 20);
    format!("kept {kept}, deleted {deleted}, freed ~{mib:.1} MiB; {held}")
}

fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "date": utc_date(u64::from(s.date_sec)),
        "date_sec": s.date_sec,
    })
}

/// The whole report as one JSON object.
fn report_json(report: &PruneReport) -> Value {
    json!({
        "dry_run": report.dry_run,
        "kept": report.kept().count(),
        "kept_snapshots": report.kept().map(snapshot_json).collect::<Vec<_>>(),
        "deleted": report.deleted().map(snapshot_json).collect::<Vec<_>>(),
        "freed_bytes": report.freed_bytes,
        "held": report.held().map(snapshot_json),
    })
}
