//! The handshake: a valid transcript, what the client sends, then one refusal per broken
//! promise of the server.

use super::super::client::NbdClient;
use super::super::handshake::{BlockSizes, Contexts};
use super::super::wire::*;
use super::script::{Duplex, Script};
use crate::error::NbdError;

const BITMAP: &str = "qemu:dirty-bitmap:daily";

fn connect(script: Script, bitmap: Option<&str>) -> Result<NbdClient<Duplex>, NbdError> {
    NbdClient::connect(Duplex::new(script), "drive0", bitmap)
}

/// The error of a handshake that must fail; it must be one line.
fn refused(script: Script, bitmap: Option<&str>) -> String {
    let err = connect(script, bitmap).expect_err("refused").to_string();
    assert!(!err.contains('\n'), "{err}");
    err
}

fn assert_has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "no {p:?} in: {err}");
    }
}

#[test]
fn a_valid_nbd_handshake_gives_size_flags_block_sizes_and_contexts() {
    let script = Script::new().handshake(1 << 30, &[(7, "base:allocation"), (9, BITMAP)]);
    let c = connect(script, Some("daily")).unwrap();
    let e = c.export();
    assert_eq!(e.size, 1 << 30);
    assert_eq!(e.flags, 1);
    assert_eq!(
        e.block,
        BlockSizes {
            min: 1,
            preferred: 4096,
            max: 32 << 20
        }
    );
    assert_eq!(
        e.contexts,
        Contexts {
            allocation: Some(7),
            dirty: Some(9)
        }
    );
}

#[test]
fn the_nbd_client_sends_flags_then_structured_replies_contexts_and_go() {
    let script = Script::new().handshake(4096, &[(1, "base:allocation")]);
    let mut duplex = Duplex::new(script);
    drop(NbdClient::connect(&mut duplex, "drive0", None).unwrap());
    let out = duplex.output;
    let mut want = 3u32.to_be_bytes().to_vec(); // C_FIXED_NEWSTYLE | C_NO_ZEROES
    want.extend(option(OPT_STRUCTURED_REPLY, &[]));
    let mut meta = Vec::new();
    meta.extend_from_slice(&6u32.to_be_bytes()); // export name length
    meta.extend_from_slice(b"drive0");
    meta.extend_from_slice(&1u32.to_be_bytes()); // one query
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    want.extend(option(OPT_SET_META_CONTEXT, &meta));
    let mut go = Vec::new();
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(b"drive0");
    go.extend_from_slice(&1u16.to_be_bytes()); // one information request
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    want.extend(option(OPT_GO, &go));
    want.extend(request(CMD_DISC, 0, 0, 0));
    assert_eq!(out, want);
}

#[test]
fn nbd_greeting_refusals_name_the_magic_or_flags() {
    let wrong = Script::new()
        .raw(b"NBDMAGIX")
        .raw(&IHAVEOPT.to_be_bytes())
        .raw(&[0, 3]);
    assert_has(
        &refused(wrong, None),
        &["greeting", "magic 0x4e42444d41474958"],
    );
    // An oldstyle server sends cliserv_magic where newstyle has IHAVEOPT.
    let old = Script::new()
        .raw(&NBDMAGIC.to_be_bytes())
        .raw(&0x0000_4202_8186_1253_u64.to_be_bytes())
        .raw(&[0, 0]);
    assert_has(
        &refused(old, None),
        &["greeting (newstyle)", "0x420281861253"],
    );
    let not_fixed = Script::new().greeting(FLAG_NO_ZEROES);
    assert_has(&refused(not_fixed, None), &["fixed newstyle", "0x0002"]);
    let short = Script::new().raw(&NBDMAGIC.to_be_bytes());
    assert_has(
        &refused(short, None),
        &["closed the connection", "greeting"],
    );
}

#[test]
fn nbd_option_replies_are_bounded_before_their_payload_is_read() {
    // 4 GiB announced, nothing behind it: refused by length, not by a failed allocation.
    let huge =
        Script::new()
            .greeting(1)
            .opt_reply_len(OPT_STRUCTURED_REPLY, REP_ACK, u32::MAX, &[]);
    assert_has(
        &refused(huge, None),
        &["NBD_OPT_STRUCTURED_REPLY", "4294967295 bytes", "65536"],
    );
    let bad_magic = Script::new().greeting(1).raw(&[0u8; 20]);
    assert_has(
        &refused(bad_magic, None),
        &["NBD_OPT_STRUCTURED_REPLY", "magic 0x0"],
    );
    let other = Script::new().greeting(1).ack(OPT_GO);
    assert_has(
        &refused(other, None),
        &["NBD_OPT_STRUCTURED_REPLY", "option 7"],
    );
    let ack_with_data = Script::new()
        .greeting(1)
        .opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[1]);
    assert_has(&refused(ack_with_data, None), &["NBD_REP_ACK of 1 bytes"]);
    let cut = Script::new()
        .greeting(1)
        .opt_reply_len(OPT_STRUCTURED_REPLY, REP_ACK, 8, &[1, 2]);
    assert_has(
        &refused(cut, None),
        &["closed", "reply to NBD_OPT_STRUCTURED_REPLY"],
    );
}

#[test]
fn nbd_refusals_of_options_carry_the_server_message() {
    let unsup =
        Script::new()
            .greeting(1)
            .opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_BIT | 1, b"too old\n");
    assert_has(
        &refused(unsup, None),
        &[
            "refused NBD_OPT_STRUCTURED_REPLY",
            "NBD_REP_ERR_UNSUP",
            "too old?",
        ],
    );
    let go = |reply: u32| {
        Script::new()
            .greeting(1)
            .ack(OPT_STRUCTURED_REPLY)
            .ack(OPT_SET_META_CONTEXT)
            .opt_reply(OPT_GO, reply, b"export 'drive0' not present")
    };
    assert_has(
        &refused(go(REP_ERR_UNKNOWN), None),
        &["no export named 'drive0'", "not present"],
    );
    assert_has(
        &refused(go(REP_ERR_BIT | 5), None),
        &["refused NBD_OPT_GO", "NBD_REP_ERR_TLS_REQD"],
    );
}

#[test]
fn an_nbd_client_refused_an_export_says_goodbye_with_nbd_opt_abort() {
    let script = Script::new()
        .greeting(1)
        .ack(OPT_STRUCTURED_REPLY)
        .ack(OPT_SET_META_CONTEXT)
        .opt_reply(OPT_GO, REP_ERR_UNKNOWN, &[])
        .ack(OPT_ABORT);
    let mut duplex = Duplex::new(script);
    let err = NbdClient::connect(&mut duplex, "drive0", None).expect_err("no such export");
    assert!(
        err.to_string().contains("no export named 'drive0'"),
        "{err}"
    );
    assert!(duplex.output.ends_with(&option(OPT_ABORT, &[])));
    assert_eq!(
        duplex.input.position() as usize,
        duplex.input.get_ref().len()
    );
    // A server that breaks the protocol is not asked for anything more.
    let mut duplex = Duplex::new(Script::new().greeting(1).raw(&[0; 20]));
    NbdClient::connect(&mut duplex, "drive0", None).expect_err("bad magic");
    assert!(!duplex.output.ends_with(&option(OPT_ABORT, &[])));
}

#[test]
fn nbd_metadata_contexts_must_be_those_asked_for() {
    let contexts = |names: &[(u32, &str)]| {
        let mut s = Script::new().greeting(1).ack(OPT_STRUCTURED_REPLY);
        for &(id, n) in names {
            s = s.meta_context(id, n);
        }
        s.ack(OPT_SET_META_CONTEXT).info_export(4096, 1).ack(OPT_GO)
    };
    let stranger = contexts(&[(1, "qemu:allocation-depth")]);
    assert_has(
        &refused(stranger, None),
        &["qemu:allocation-depth", "id 1", "not asked for"],
    );
    let twice = contexts(&[(1, "base:allocation"), (2, "base:allocation")]);
    assert_has(&refused(twice, None), &["granted twice", "id 2"]);
    let no_bitmap = contexts(&[(1, "base:allocation")]);
    assert_has(
        &refused(no_bitmap, Some("daily")),
        &["did not grant", "'qemu:dirty-bitmap:daily'"],
    );
    let short = Script::new()
        .greeting(1)
        .ack(OPT_STRUCTURED_REPLY)
        .opt_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &[0, 1]);
    assert_has(&refused(short, None), &["NBD_REP_META_CONTEXT of 2 bytes"]);
    // A server without metadata contexts: allocation is unknown, and that is allowed.
    let none = Script::new()
        .greeting(1)
        .ack(OPT_STRUCTURED_REPLY)
        .opt_reply(OPT_SET_META_CONTEXT, REP_ERR_BIT | 1, &[])
        .info_export(4096, 1)
        .ack(OPT_GO);
    let c = connect(none, None).unwrap();
    assert_eq!(c.export().contexts, Contexts::default());
}

#[test]
fn nbd_go_replies_are_checked_field_by_field() {
    let go = |infos: Script| {
        let mut s = Script::new()
            .greeting(1)
            .ack(OPT_STRUCTURED_REPLY)
            .ack(OPT_SET_META_CONTEXT);
        s.0.extend(infos.0);
        s.ack(OPT_GO)
    };
    let no_export = go(Script::new().info_block(1, 4096, 1 << 20));
    assert_has(
        &refused(no_export, None),
        &["NBD_OPT_GO", "before NBD_INFO_EXPORT"],
    );
    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&[0; 8]);
    let short = go(Script::new().opt_reply(OPT_GO, REP_INFO, &p));
    assert_has(
        &refused(short, None),
        &["NBD_INFO_EXPORT of 10 bytes", "expected 12"],
    );
    let huge = go(Script::new().info_export(1 << 57, 1));
    assert_has(&refused(huge, None), &["export size 144115188075855872"]);
    for (min, preferred, max) in [
        (3, 4096, 1 << 20),
        (1 << 17, 1 << 17, 1 << 20),
        (512, 256, 4096),
        (512, 4096, 1000),
        (4096, 4096, 512),
    ] {
        let bad = go(Script::new()
            .info_export(4096, 1)
            .info_block(min, preferred, max));
        let err = refused(bad, None);
        assert_has(&err, &["block sizes", &format!("minimum {min}")]);
    }
    let tiny = go(Script::new().opt_reply(OPT_GO, REP_INFO, &[0]));
    assert_has(&refused(tiny, None), &["NBD_REP_INFO of 1 bytes"]);
    // Unknown information is skipped; a maximum above 32 MiB is kept to 32 MiB.
    let fine = go(Script::new()
        .opt_reply(OPT_GO, REP_INFO, &[0, 2, b'h', b'i'])
        .info_export(1 << 20, 1)
        .info_block(512, 4096, u32::MAX));
    let c = connect(fine, None).unwrap();
    assert_eq!(c.export().block.max, 32 << 20);
    assert_eq!(c.export().block.min, 512);
}

#[test]
fn an_nbd_server_that_keeps_sending_information_is_cut_off() {
    let mut s = Script::new()
        .greeting(1)
        .ack(OPT_STRUCTURED_REPLY)
        .ack(OPT_SET_META_CONTEXT);
    for _ in 0..1100 {
        s = s.info_export(4096, 1);
    }
    assert_has(&refused(s, None), &["NBD_OPT_GO", "more than 1024 replies"]);
}
