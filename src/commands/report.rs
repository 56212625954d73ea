//! Text and JSON output of `dump`, `status` and `list`.

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use blkdelta_common::digest::to_hex;
use blkdelta_common::image::qcow2::Qcow2Image;
use blkdelta_common::stream::{Compression, Record, SnapRef, StreamHeader};
use blkdelta_receive::apply::ReceiveSummary;
use blkdelta_receive::history::ReplicaSnapshot;
use blkdelta_receive::state::{self, Health, ReplicaState};
use blkdelta_receive::target::ReplicaFormat;
use blkdelta_send::pipeline::plan_transitions;
use blkdelta_send::ChangeSource;
use serde_json::{json, Value};

use super::{open_stream, verify};
use crate::cli::{DumpArgs, StatusArgs};

fn snap_json(s: &SnapRef) -> Value {
    json!({ "name": s.name, "guid": to_hex(&s.guid) })
}

fn header_json(h: &StreamHeader) -> Value {
    let transitions: Vec<Value> = h
        .transitions
        .iter()
        .map(|t| {
            json!({
                "from": t.from.as_ref().map(snap_json),
                "to": snap_json(&t.to),
                "virtual_size": t.virtual_size,
            })
        })
        .collect();
    json!({
        "record": "header",
        "stream_id": to_hex(&h.stream_id),
        "source_kind": h.source.kind,
        "source_name": h.source.name,
        "virtual_size": h.virtual_size,
        "transitions": transitions,
        "total_extents": h.total_extents,
        "total_data_bytes": h.total_data_bytes,
        "total_zero_bytes": h.total_zero_bytes,
        "resume_offset": h.resume_offset,
    })
}

fn record_json(rec: &Record, at: u64) -> Value {
    match rec {
        Record::Data(d) => json!({
            "record": "data", "at": at, "offset": d.offset, "len": d.len,
            "compression": match d.compression { Compression::None => "none", Compression::Zstd => "zstd" },
            "payload_len": d.payload.len(), "hash": to_hex(&d.hash),
        }),
        Record::Zero { offset, len } => {
            json!({ "record": "zero", "at": at, "offset": offset, "len": len })
        }
        Record::Discard { offset, len } => {
            json!({ "record": "discard", "at": at, "offset": offset, "len": len })
        }
        Record::Checkpoint(c) => json!({
            "record": "checkpoint", "at": at, "prefix_hash": to_hex(&c.prefix_hash),
        }),
        Record::SnapshotInfo(i) => json!({
            "record": "snapshot-info", "at": at, "transition": i.transition, "id": i.id,
            "name": i.name, "date_sec": i.date_sec, "date_nsec": i.date_nsec,
            "vm_clock_nsec": i.vm_clock_nsec, "disk_size": i.disk_size,
            "guid": to_hex(&i.guid()),
        }),
        Record::SnapshotEnd(e) => json!({
            "record": "snapshot-end", "at": at, "transition": e.transition, "name": e.name,
            "guid": to_hex(&e.guid), "virtual_size": e.virtual_size,
            "digest": e.digest.map(|d| to_hex(&d)),
            "prefix_hash": to_hex(&e.prefix_hash),
        }),
        Record::End(e) => json!({
            "record": "end", "at": at, "records": e.records,
            "stream_hash": to_hex(&e.stream_hash), "verified": true,
        }),
    }
}

/// Formats a JSON record as one `key=value` line.
fn text_line(v: &Value) -> String {
    let obj = v.as_object().expect("records are objects");
    let mut line = obj["record"].as_str().unwrap_or("?").to_string();
    for (k, val) in obj.iter().filter(|(k, _)| *k != "record") {
        let shown = match val {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            Value::Array(items) => items
                .iter()
                .map(transition_text)
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        line.push_str(&format!(" {k}={shown}"));
    }
    line
}

fn transition_text(t: &Value) -> String {
    let name = |s: &Value| s["name"].as_str().map_or("-".to_string(), str::to_string);
    format!("{}->{}", name(&t["from"]), name(&t["to"]))
}

/// `blkdelta dump`.
pub fn dump(a: DumpArgs, out: &mut dyn Write) -> Result<()> {
    let mut reader = open_stream(a.file.as_deref())?;
    let emit = |out: &mut dyn Write, v: Value| -> Result<()> {
        if a.json {
            writeln!(out, "{v}")?;
        } else {
            writeln!(out, "{}", text_line(&v))?;
        }
        Ok(())
    };
    emit(out, header_json(reader.header()))?;
    while let Some(rec) = reader.next_record()? {
        let at = reader.record_position();
        verify(&rec, at)?;
        emit(out, record_json(&rec, at))?;
    }
    Ok(())
}

/// `blkdelta status`.
pub fn status(
    a: &StatusArgs,
    st: &ReplicaState,
    health: &Health,
    history: &[ReplicaSnapshot],
    path: &Path,
    out: &mut dyn Write,
) -> Result<()> {
    let replica = match health {
        Health::Unchanged => "unchanged".to_string(),
        Health::Missing => "missing".to_string(),
        Health::Changed(what) => format!("changed since blkdelta last wrote it: {what}"),
    };
    if a.json {
        let mut v = serde_json::to_value(st)?;
        v["replica"] = json!(replica);
        v["holds"] = json!(state::describe(st));
        let format =
            blkdelta_receive::target::replica_format(&a.target, None).map_or("raw", |f| match f {
                ReplicaFormat::Qcow2 => "qcow2",
                ReplicaFormat::Raw => "raw",
            });
        v["replica_format"] = json!(format);
        if !history.is_empty() {
            v["snapshots"] = serde_json::to_value(history)?;
        }
        v["resume_token"] = json!(st
            .in_progress
            .as_ref()
            .and_then(|p| p.token())
            .map(|t| t.to_string()));
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(out, "replica:      {}", a.target.display())?;
    writeln!(out, "state file:   {}", path.display())?;
    writeln!(out, "source:       {} {}", st.source_kind, st.source_name)?;
    writeln!(out, "virtual size: {}", st.virtual_size)?;
    if !history.is_empty() {
        let names: Vec<&str> = history.iter().map(|s| s.name.as_str()).collect();
        writeln!(
            out,
            "history:      {} snapshot(s), oldest first: {}",
            history.len(),
            names.join(", ")
        )?;
    }
    if *health != Health::Unchanged {
        let last = st
            .snapshot
            .as_ref()
            .map_or(String::new(), |s| format!("; it last held '{}'", s.name));
        writeln!(out, "state:        the replica is {replica}{last}")?;
        writeln!(
            out,
            "              it holds no known snapshot: 'blkdelta verify' shows what differs, \
             'blkdelta send --against' repairs it, or seed it again"
        )?;
        return Ok(());
    }
    match (&st.snapshot, &st.in_progress) {
        (_, Some(p)) => {
            let from = p
                .from
                .as_ref()
                .map_or("(full)".to_string(), |f| format!("'{}'", f.name));
            writeln!(
                out,
                "state:        in progress, {from} -> '{}' (transition {}, durable below offset {})",
                p.to.name, p.transition, p.durable_offset
            )?;
            writeln!(
                out,
                "              holds no complete snapshot; apply the same stream again to finish"
            )?;
            if let Some(token) = p.token() {
                writeln!(out, "resume token: {token}")?;
                let undo = p
                    .undo
                    .as_ref()
                    .map_or(String::new(), |u| format!(" --undo {u}"));
                writeln!(
                    out,
                    "              or: blkdelta send --resume {token} SOURCE | blkdelta receive{undo} {}{}",
                    a.target.display(),
                    super::state_arg(a.state.as_deref())
                )?;
            }
            if let Some(u) = &p.undo {
                writeln!(out, "undo stream:  {u} (pass --undo {u} to finish)")?;
            }
        }
        (Some(s), None) => {
            writeln!(
                out,
                "state:        holds snapshot '{}' (guid {})",
                s.name, s.guid
            )?;
            match &st.digest {
                Some(d) => writeln!(out, "digest:       {d} (kept block hashes)")?,
                None => writeln!(out, "digest:       no block hashes kept")?,
            }
        }
        (None, None) => writeln!(out, "state:        holds {}", state::describe(st))?,
    }
    Ok(())
}

pub use blkdelta_common::time::utc_date;

/// `blkdelta list`.
pub fn list(img: &Qcow2Image, as_json: bool, out: &mut dyn Write) -> Result<()> {
    let bitmaps = img.bitmaps()?;
    if as_json {
        let snaps: Vec<Value> = img
            .snapshots()
            .iter()
            .map(|s| {
                json!({ "id": s.id, "name": s.name, "guid": to_hex(&s.guid()),
                        "virtual_size": s.disk_size, "date_sec": s.date_sec, "date_nsec": s.date_nsec })
            })
            .collect();
        let bms: Vec<Value> = bitmaps
            .iter()
            .map(|b| {
                json!({ "name": b.name, "granularity": 1u64 << b.granularity_bits,
                        "in_use": b.in_use, "auto": b.auto })
            })
            .collect();
        writeln!(out, "{}", json!({ "snapshots": snaps, "bitmaps": bms }))?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<4} {:<20} {:<32} {:>14} DATE (UTC)",
        "ID", "NAME", "GUID", "SIZE"
    )?;
    for s in img.snapshots() {
        writeln!(
            out,
            "{:<4} {:<20} {:<32} {:>14} {}",
            s.id,
            s.name,
            to_hex(&s.guid()),
            s.disk_size,
            utc_date(u64::from(s.date_sec))
        )?;
    }
    if !bitmaps.is_empty() {
        writeln!(out, "bitmaps:")?;
        for b in &bitmaps {
            let mut flags = vec![if b.auto { "enabled" } else { "disabled" }];
            if b.in_use {
                flags.push("in-use (invalid)");
            }
            writeln!(
                out,
                "  {:<20} granularity {:>8} {}",
                b.name,
                1u64 << b.granularity_bits,
                flags.join(", ")
            )?;
        }
    }
    Ok(())
}

/// `blkdelta send --dry-run`: the plan, from metadata alone.
pub fn send_plan(source: &dyn ChangeSource, out: &mut dyn Write) -> Result<()> {
    let plans = plan_transitions(source)?;
    let info = source.info();
    writeln!(out, "source: {} {}", info.kind, info.name)?;
    if source.resume_offset() > 0 {
        writeln!(out, "resumes at offset {}", source.resume_offset())?;
    }
    for (t, p) in source.transitions().iter().zip(&plans) {
        let from = t
            .from
            .as_ref()
            .map_or("(full)".to_string(), |f| format!("'{}'", f.name));
        writeln!(
            out,
            "{from} -> '{}': {} extents, {} data bytes, {} bytes zeroed or discarded, virtual size {}",
            t.to.name, p.extents, p.data_bytes, p.zero_bytes, t.virtual_size
        )?;
    }
    let data: u64 = plans.iter().map(|p| p.data_bytes).sum();
    writeln!(
        out,
        "total: {data} data bytes at most (all-zero chunks are sent as zero records)"
    )?;
    Ok(())
}

/// `blkdelta receive --dry-run`: what the stream would do to the replica.
pub fn dry_receive(s: &ReceiveSummary, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "dry run: the stream is intact and applies to this replica"
    )?;
    if s.skipped_transitions > 0 {
        writeln!(
            out,
            "would skip {} transition(s) the replica is past",
            s.skipped_transitions
        )?;
    }
    writeln!(
        out,
        "would write {} data bytes in {} records and zero or discard {} bytes, reaching {}",
        s.data_bytes,
        s.data_records,
        s.zero_bytes,
        s.snapshots
            .iter()
            .map(|n| format!("'{n}'"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(out, "nothing was written")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::utc_date;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_date(1_795_305_599), "2026-11-21 23:59:59");
    }
}
