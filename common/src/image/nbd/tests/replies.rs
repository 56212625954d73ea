//! Replies of the transmission phase: reads assembled from chunks in any order, replies to
//! several requests interleaved, block status, and one refusal per broken promise.

use super::super::client::NbdClient;
use super::super::reply::StatusExtent;
use super::super::wire::*;
use super::script::{Duplex, Script};
use crate::ImageError;

const SIZE: u64 = 1 << 20;

/// A client past the handshake of a 1 MiB export with `base:allocation` as context 1 and a
/// dirty bitmap as context 2; the replies follow.
fn client(replies: Script) -> NbdClient<Duplex> {
    let mut s =
        Script::new().handshake(SIZE, &[(1, "base:allocation"), (2, "qemu:dirty-bitmap:b")]);
    s.0.extend(replies.0);
    NbdClient::connect(Duplex::new(s), "drive0", Some("b")).unwrap()
}

/// The one-line error of a call that must fail.
fn line(e: ImageError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "{s}");
    s
}

fn assert_has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "no {p:?} in: {err}");
    }
}

fn read_err(replies: Script, ranges: &[(u64, u32)]) -> String {
    line(client(replies).read_many(ranges).expect_err("refused"))
}

fn status_err(replies: Script, offset: u64, len: u32) -> String {
    line(
        client(replies)
            .block_status(offset, len)
            .expect_err("refused"),
    )
}

#[test]
fn nbd_read_chunks_in_any_order_and_holes_assemble_the_range() {
    let replies = Script::new()
        .data(1, 4096 + 6, b"world", false)
        .hole(1, 4096 + 2, 4, false)
        .data(1, 4096, b"he", false)
        .none(1);
    let mut c = client(replies);
    let got = c.read_many(&[(4096, 11)]).unwrap();
    assert_eq!(got, vec![b"he\0\0\0\0world".to_vec()]);
}

#[test]
fn nbd_replies_out_of_order_and_interleaved_are_matched_by_handle() {
    let replies = Script::new()
        .data(3, 200, b"cc", true)
        .data(1, 0, b"a", false)
        .data(2, 100, b"bb", false)
        .data(1, 1, b"A", true)
        .hole(2, 102, 2, true);
    let mut c = client(replies);
    let got = c.read_many(&[(0, 2), (100, 4), (200, 2)]).unwrap();
    assert_eq!(
        got,
        vec![b"aA".to_vec(), b"bb\0\0".to_vec(), b"cc".to_vec()]
    );
}

#[test]
fn nbd_block_status_gives_extents_per_context() {
    let replies = Script::new()
        .status(1, 2, &[(8192, 1), (4096, 0)], false)
        .status(
            1,
            1,
            &[
                (4096, 0),
                (4096, STATE_HOLE | STATE_ZERO),
                (8192, STATE_ZERO),
            ],
            true,
        );
    let st = client(replies).block_status(4096, 16384).unwrap();
    let e = |offset, len, flags| StatusExtent { offset, len, flags };
    assert_eq!(
        st.allocation.unwrap(),
        vec![e(4096, 4096, 0), e(8192, 4096, 3), e(12288, 8192, 2)]
    );
    assert_eq!(st.dirty.unwrap(), vec![e(4096, 8192, 1), e(12288, 4096, 0)]);
}

#[test]
fn an_nbd_reply_for_a_handle_not_in_flight_is_refused() {
    let err = read_err(Script::new().data(9, 0, b"x", true), &[(0, 1)]);
    assert_has(
        &err,
        &[
            "structured reply chunk for handle 0x9",
            "no request in flight",
        ],
    );
    let err = read_err(Script::new().simple(0, 0), &[(0, 1)]);
    assert_has(&err, &["simple reply for handle 0x0"]);
    // A handle is in flight until its reply is done, not after.
    let again = Script::new().data(1, 0, b"x", true).data(1, 0, b"x", true);
    let mut c = client(again);
    c.read_many(&[(0, 1)]).unwrap();
    let err = line(c.read_many(&[(0, 1)]).expect_err("handle 1 is done"));
    assert_has(&err, &["handle 0x1"]);
}

#[test]
fn nbd_read_content_outside_the_request_or_overlapping_is_refused() {
    let err = read_err(Script::new().data(1, 10, b"abc", true), &[(8, 4)]);
    assert_has(
        &err,
        &[
            "NBD_REPLY_TYPE_OFFSET_DATA",
            "NBD_CMD_READ at offset 8 (+4 bytes)",
            "offset 10 (+3 bytes) lies outside",
        ],
    );
    let err = read_err(Script::new().hole(1, 4, 4, true), &[(8, 4)]);
    assert_has(
        &err,
        &[
            "NBD_REPLY_TYPE_OFFSET_HOLE",
            "offset 4 (+4 bytes) lies outside",
        ],
    );
    let overlap = Script::new().data(1, 8, b"ab", false).hole(1, 9, 3, true);
    assert_has(
        &read_err(overlap, &[(8, 4)]),
        &["offset 9 (+3 bytes) overlaps"],
    );
    let inside = Script::new().hole(1, 8, 4, false).data(1, 9, b"x", true);
    assert_has(
        &read_err(inside, &[(8, 4)]),
        &["offset 9 (+1 bytes) overlaps"],
    );
    // 4 GiB of data announced for a 4-byte read: refused from its offset, nothing allocated.
    let huge = Script::new().chunk_len(1, REPLY_TYPE_OFFSET_DATA, 1, u32::MAX, &8u64.to_be_bytes());
    assert_has(
        &read_err(huge, &[(8, 4)]),
        &["+4294967287 bytes) lies outside"],
    );
    let wrapping = Script::new().hole(1, u64::MAX - 1, 4, true);
    assert_has(&read_err(wrapping, &[(8, 4)]), &["lies outside"]);
    let empty = Script::new().hole(1, 8, 0, true);
    assert_has(
        &read_err(empty, &[(8, 4)]),
        &["a hole of 0 bytes at offset 8"],
    );
}

#[test]
fn nbd_read_replies_of_wrong_shape_are_refused() {
    let short_data = Script::new().chunk(1, REPLY_TYPE_OFFSET_DATA, 1, &[0; 8]);
    assert_has(
        &read_err(short_data, &[(0, 4)]),
        &["payload of 8 bytes, expected at least 9"],
    );
    let long_hole = Script::new().chunk(1, REPLY_TYPE_OFFSET_HOLE, 1, &[0; 16]);
    assert_has(
        &read_err(long_hole, &[(0, 4)]),
        &["payload of 16 bytes, expected 12"],
    );
    let incomplete = Script::new().data(1, 0, b"ab", true);
    assert_has(
        &read_err(incomplete, &[(0, 4)]),
        &["done after covering 2 bytes"],
    );
    let simple = Script::new().simple(1, 0);
    assert_has(
        &read_err(simple, &[(0, 4)]),
        &["NBD simple reply to NBD_CMD_READ", "does not answer"],
    );
    let status = Script::new().status(1, 1, &[(4, 0)], true);
    assert_has(
        &read_err(status, &[(0, 4)]),
        &["NBD_REPLY_TYPE_BLOCK_STATUS reply to NBD_CMD_READ"],
    );
    let none = Script::new().chunk(0, REPLY_TYPE_NONE, 1, &[]);
    assert_has(&read_err(none, &[(0, 4)]), &["without NBD_REPLY_FLAG_DONE"]);
    let none_data = Script::new().chunk(1, REPLY_TYPE_NONE, 1, &[0]);
    assert_has(
        &read_err(none_data, &[(0, 4)]),
        &["payload of 1 bytes, expected 0"],
    );
    let unknown = Script::new().chunk(1, 77, 1, &[]);
    assert_has(&read_err(unknown, &[(0, 4)]), &["unknown chunk type 77"]);
    let magic = Script::new().raw(&[0x6e, 0x8a, 0x27, 0x8c]).raw(&[0; 28]);
    assert_has(
        &read_err(magic, &[(0, 4)]),
        &["reply header: magic 0x6e8a278c"],
    );
}

#[test]
fn an_nbd_server_that_stops_mid_reply_is_a_closed_connection() {
    let cut_data = Script::new().chunk_len(1, REPLY_TYPE_OFFSET_DATA, 1, 12, &[0; 10]);
    assert_has(
        &read_err(cut_data, &[(0, 4)]),
        &[
            "closed the connection",
            "NBD_REPLY_TYPE_OFFSET_DATA reply to NBD_CMD_READ at offset 0",
        ],
    );
    let cut_header = Script::new()
        .raw(&STRUCTURED_REPLY_MAGIC.to_be_bytes())
        .raw(&[0; 3]);
    assert_has(
        &read_err(cut_header, &[(0, 4)]),
        &["closed the connection during a reply header"],
    );
    assert_has(
        &read_err(Script::new(), &[(0, 4)]),
        &["closed the connection"],
    );
    let no_done = Script::new().data(1, 0, b"abcd", false);
    assert_has(
        &read_err(no_done, &[(0, 4)]),
        &["closed the connection during a reply header"],
    );
}

#[test]
fn nbd_server_errors_fail_the_request_and_keep_the_connection() {
    let replies = Script::new()
        .error(1, 5, "bad\tsector", false)
        .data(1, 0, b"ab", true)
        .data(2, 0, b"ok", true);
    let mut c = client(replies);
    let err = line(c.read_many(&[(0, 2)]).expect_err("EIO"));
    assert_has(
        &err,
        &[
            "failed NBD_CMD_READ at offset 0 (+2 bytes)",
            "EIO (error 5)",
            "bad?sector",
        ],
    );
    assert_eq!(c.read_many(&[(0, 2)]).unwrap(), vec![b"ok".to_vec()]);

    let mut p = 22u32.to_be_bytes().to_vec();
    p.extend_from_slice(&0u16.to_be_bytes());
    p.extend_from_slice(&4096u64.to_be_bytes());
    let at = Script::new().chunk(1, REPLY_TYPE_ERROR_OFFSET, 1, &p);
    assert_has(
        &read_err(at, &[(0, 8192)]),
        &["EINVAL (error 22) at offset 4096"],
    );
    let unknown_error = Script::new().chunk(1, 0x8005, 1, &[0, 0, 0, 1, 0, 0, 9, 9]);
    assert_has(&read_err(unknown_error, &[(0, 4)]), &["EPERM (error 1)"]);
    let long_message = Script::new().chunk(1, REPLY_TYPE_ERROR, 1, &[0, 0, 0, 5, 0, 9, b'x']);
    assert_has(
        &read_err(long_message, &[(0, 4)]),
        &["error message of 9 bytes in a payload of 7"],
    );
    let huge = Script::new().chunk_len(1, REPLY_TYPE_ERROR, 1, 1 << 30, &[]);
    assert_has(
        &read_err(huge, &[(0, 4)]),
        &["payload of 1073741824 bytes exceeds 65536"],
    );
    let simple = Script::new().simple(1, 28);
    assert_has(&status_err(simple, 0, 4096), &["ENOSPC (error 28)"]);
}

#[test]
fn nbd_extent_lists_that_break_the_rules_are_refused() {
    let s = || Script::new();
    let zero = s().status(1, 1, &[(4096, 0), (0, 0)], true);
    assert_has(&status_err(zero, 0, 8192), &["extent 1 has length 0"]);
    let past = s().status(1, 1, &[(4096, 0), (8192, 0)], true);
    assert_has(
        &status_err(past, 0, 8192),
        &["extents run to offset 12288, past the request's end 8192"],
    );
    let past_size = s().status(1, 1, &[(u32::MAX, 0)], true);
    assert_has(
        &status_err(past_size, SIZE - 4096, 4096),
        &["past the request's end 1048576"],
    );
    // Extents are lengths from the request's offset: a list that runs backwards is a second
    // list for the same context.
    let backwards = s()
        .status(1, 1, &[(8192, 0)], false)
        .status(1, 1, &[(4096, 3)], true);
    assert_has(
        &status_err(backwards, 0, 8192),
        &["second list of extents for metadata context id 1"],
    );
    let stranger = s().status(1, 5, &[(4096, 0)], true);
    assert_has(
        &status_err(stranger, 0, 8192),
        &["context id 5, which was not negotiated"],
    );
    let missing = s().status(1, 1, &[(4096, 0)], true);
    assert_has(
        &status_err(missing, 0, 8192),
        &["without extents for metadata context 'qemu:dirty-bitmap'"],
    );
    let bad_len = s().chunk(
        1,
        REPLY_TYPE_BLOCK_STATUS,
        1,
        &[0, 0, 0, 1, 0, 0, 0, 1, 0, 0],
    );
    assert_has(
        &status_err(bad_len, 0, 8192),
        &["payload of 10 bytes, expected 4 + a positive multiple of 8"],
    );
    let empty = s().chunk(1, REPLY_TYPE_BLOCK_STATUS, 1, &[0, 0, 0, 1]);
    assert_has(&status_err(empty, 0, 8192), &["payload of 4 bytes"]);
    let huge = s().chunk_len(1, REPLY_TYPE_BLOCK_STATUS, 1, 0xffff_fffc, &[]);
    assert_has(
        &status_err(huge, 0, 8192),
        &["payload of 4294967292 bytes exceeds 2097156"],
    );
    let data = s().data(1, 0, b"x", true);
    assert_has(
        &status_err(data, 0, 8192),
        &["NBD_REPLY_TYPE_OFFSET_DATA reply to NBD_CMD_BLOCK_STATUS"],
    );
    let simple = s().simple(1, 0);
    assert_has(
        &status_err(simple, 0, 8192),
        &["simple reply without an error"],
    );
}

#[test]
fn nbd_requests_outside_the_export_are_refused_before_sending() {
    let mut c = client(Script::new());
    assert!(matches!(
        c.read_many(&[(SIZE - 1, 2)]),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        c.read_many(&[(0, 0)]),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        c.read_many(&[(0, (32 << 20) + 1)]),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        c.block_status(SIZE, 1),
        Err(ImageError::OutOfRange { .. })
    ));
}

#[test]
fn an_nbd_client_disconnects_once_and_then_refuses_requests() {
    let mut c = client(Script::new());
    c.disconnect().unwrap();
    let err = line(c.read_many(&[(0, 1)]).expect_err("disconnected"));
    assert_has(&err, &["ended by this client (NBD_CMD_DISC)"]);
    assert!(c.disconnect().is_err());
}

#[test]
fn a_broken_nbd_connection_stays_broken() {
    let mut c = client(Script::new().data(7, 0, b"x", true).data(1, 0, b"x", true));
    let first = line(c.read_many(&[(0, 1)]).expect_err("unknown handle"));
    let second = line(c.read_many(&[(0, 1)]).expect_err("still broken"));
    assert_eq!(first, second);
}

#[test]
fn many_nbd_reads_keep_a_bounded_number_in_flight() {
    // 40 reads; the server answers each as soon as it is asked (replies follow requests).
    let mut s = Script::new();
    for h in 1..=40u64 {
        s = s.data(h, h * 10, &[h as u8; 3], true);
    }
    let mut c = client(s);
    let ranges: Vec<(u64, u32)> = (1..=40u64).map(|h| (h * 10, 3)).collect();
    let got = c.read_many(&ranges).unwrap();
    for (h, data) in (1..=40u64).zip(got) {
        assert_eq!(data, vec![h as u8; 3]);
    }
}
