//! NBD exports as sources: `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`
//! (a running QEMU's disk exported for a backup, `qemu-nbd`, `qemu-storage-daemon`).
//!
//! ```text
//! full      : base:allocation ──► data | zero | hole (sent as a discard) ──► reads
//! --bitmap  : qemu:dirty-bitmap:NAME ──► dirty ranges ──► base:allocation ──► extents ──► reads
//! ```
//!
//! An export has no durable identity: the state a stream produces is named (`--to-name`; the
//! export's name for a full stream, the bitmap's for an incremental) and fingerprinted with
//! random bytes, so every send produces a state of its own, as a block device's does. An
//! incremental's base is whichever state of the bitmap's name (`--from-name`) the replica
//! holds: a seed sent with `--to-name NAME` starts the chain, as for a qcow2 image's bitmap.
//! The export must hold still while it is read (QEMU's backup exports of a point in time do).

use std::sync::Arc;

use blkdelta_common::extent::{Coalescer, ExtentSink, Visit};
use blkdelta_common::image::nbd::{NbdImage, NbdOptions, NbdUri};
use blkdelta_common::image::BlockSource;
use blkdelta_common::limits::MAX_NAME_BYTES;
use blkdelta_common::stream::{random_id, SnapRef, SourceInfo, Transition};

use super::util::push_status;
use super::{identity, ChangeSource, FullSource, SourceOptions};
use crate::SendError;

/// Opens the export `spec` names: a full stream, or with `opts.bitmap` what that dirty
/// bitmap marks dirty. Refuses the options that read files (`--since`, `--changed-blocks`,
/// `--compare`) and a malformed URI as usage errors; a server that cannot be reached, an
/// export or a bitmap it does not have, as errors naming them.
pub fn open(spec: &str, opts: &SourceOptions) -> Result<Box<dyn ChangeSource>, SendError> {
    for (given, option) in [
        (opts.since.is_some(), "--since"),
        (opts.changed_blocks.is_some(), "--changed-blocks"),
        (opts.compare_old.is_some(), "--compare"),
    ] {
        if given {
            return Err(SendError::Usage(format!(
                "{option} reads image files: it does not take an NBD export as SOURCE"
            )));
        }
    }
    let uri = NbdUri::parse(spec).map_err(|e| SendError::Usage(e.to_string()))?;
    let name = uri.to_string();
    if name.len() > MAX_NAME_BYTES {
        return Err(SendError::Usage(format!(
            "the NBD URI is {} bytes long, more than the {MAX_NAME_BYTES} a stream header holds",
            name.len()
        )));
    }
    let nbd_opts = NbdOptions {
        dirty_bitmap: opts.bitmap.clone(),
        ..NbdOptions::default()
    };
    let image = Arc::new(NbdImage::open(&uri, &nbd_opts)?);
    let info = SourceInfo {
        kind: "nbd".into(),
        name,
    };
    match &opts.bitmap {
        Some(bitmap) => Ok(Box::new(NbdBitmapSource::new(image, info, bitmap, opts))),
        None if opts.from_name.is_some() => Err(SendError::Usage(
            "--from-name names the base of --bitmap: a full stream of an NBD export has none"
                .into(),
        )),
        None => {
            let to = opts.to_name.as_deref().unwrap_or(default_name(&uri));
            Ok(Box::new(FullSource::new(image, info, new_state(to))))
        }
    }
}

/// The point-in-time export of a running QEMU's disk ([`super::live::Checkpoint`]): the whole
/// disk when there is no base, else what `bitmap` marks dirty since `from`; the stream
/// produces `to`, and names its source `qemu` `node`.
pub fn open_checkpoint(
    uri: &str,
    bitmap: Option<&str>,
    from: Option<SnapRef>,
    to: SnapRef,
    node: &str,
) -> Result<Box<dyn ChangeSource>, SendError> {
    let uri = NbdUri::parse(uri).map_err(|e| SendError::Live(e.to_string()))?;
    let nbd_opts = NbdOptions {
        dirty_bitmap: bitmap.map(str::to_string),
        ..NbdOptions::default()
    };
    let image = Arc::new(NbdImage::open(&uri, &nbd_opts)?);
    let info = SourceInfo {
        kind: "qemu".into(),
        name: node.to_string(),
    };
    match from {
        None => Ok(Box::new(FullSource::new(image, info, to))),
        Some(from) => {
            let transitions = vec![Transition {
                from: Some(from),
                to,
                virtual_size: image.size(),
            }];
            Ok(Box::new(NbdBitmapSource {
                image,
                info,
                transitions,
            }))
        }
    }
}

/// The name of the state a full stream of `uri` produces without `--to-name`: the export's
/// name, or `nbd` for a server's default export.
fn default_name(uri: &NbdUri) -> &str {
    if uri.export.is_empty() {
        "nbd"
    } else {
        &uri.export
    }
}

/// A state called `name` that no other send produces: an export cannot be fingerprinted.
fn new_state(name: &str) -> SnapRef {
    SnapRef::named_state(name, &random_id())
}

/// What a dirty bitmap of an export recorded: one transition from → to.
struct NbdBitmapSource {
    image: Arc<NbdImage>,
    info: SourceInfo,
    transitions: Vec<Transition>,
}

impl NbdBitmapSource {
    fn new(image: Arc<NbdImage>, info: SourceInfo, bitmap: &str, opts: &SourceOptions) -> Self {
        let from = opts.from_name.as_deref().unwrap_or(bitmap);
        let to = opts.to_name.as_deref().unwrap_or(bitmap);
        let transitions = vec![Transition {
            from: Some(identity::named(from)),
            to: new_state(to),
            virtual_size: image.size(),
        }];
        NbdBitmapSource {
            image,
            info,
            transitions,
        }
    }
}

impl ChangeSource for NbdBitmapSource {
    fn info(&self) -> SourceInfo {
        self.info.clone()
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    /// The dirty ranges, each classified by the export's allocation status.
    fn changes(&self, _index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        let mut c = Coalescer::new(sink);
        let image = self.image.as_ref();
        image.for_each_dirty(|offset, len| -> Result<Visit, SendError> {
            push_status(image, offset, offset + len, &mut c)
        })?;
        c.finish()?;
        Ok(())
    }

    fn reader(&self, _index: usize) -> Arc<dyn BlockSource> {
        Arc::clone(&self.image) as Arc<dyn BlockSource>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(spec: &str, opts: &SourceOptions) -> String {
        match open(spec, opts) {
            Err(SendError::Usage(m)) => m,
            Err(e) => panic!("not a usage error: {e}"),
            Ok(_) => panic!("accepted {spec}"),
        }
    }

    #[test]
    fn nbd_sources_refuse_file_options_and_bad_uris_as_usage_errors() {
        let uri = "nbd+unix:///x?socket=/nonexistent/s";
        let since = SourceOptions {
            since: Some("base.qcow2".into()),
            ..SourceOptions::default()
        };
        assert!(refusal(uri, &since).contains("--since reads image files"));
        let bad = refusal("nbd://host:0/x", &SourceOptions::default());
        assert!(bad.contains("port '0'"), "{bad}");
        let tls = refusal("nbds://host/x", &SourceOptions::default());
        assert!(tls.contains("scheme 'nbds'"), "{tls}");
    }

    #[test]
    fn an_unreachable_nbd_server_is_an_error_naming_the_socket() {
        let err = open(
            "nbd+unix:///x?socket=/nonexistent/s",
            &SourceOptions::default(),
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(
            err.contains("cannot connect to the NBD server at unix socket /nonexistent/s"),
            "{err}"
        );
    }

    #[test]
    fn every_nbd_send_produces_a_state_of_its_own() {
        let (a, b) = (new_state("daily"), new_state("daily"));
        assert_ne!(a.guid, b.guid);
        assert!(identity::named("daily").answers_to("daily", &a.guid));
        assert!(identity::named("daily").answers_to("daily", &b.guid));
    }
}
