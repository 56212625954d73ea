use super::*;

#[test]
fn round_trips_every_byte() {
    let all: Vec<u8> = (0..=255).collect();
    let text = to_hex(&all);
    assert_eq!(&text[..8], "00010203");
    assert_eq!(&text[text.len() - 4..], "feff");
    assert_eq!(from_hex::<256>(&text).map(|b| b.to_vec()), Some(all));
}

#[test]
fn reads_either_case() {
    assert_eq!(from_hex::<4>("DeadBEEF"), Some([0xde, 0xad, 0xbe, 0xef]));
    assert_eq!(from_hex::<0>(""), Some([]));
}

#[test]
fn refuses_anything_but_exactly_2n_digits() {
    for bad in [
        "dead",
        "deadbee",
        "deadbeef0",
        "+eadbeef",
        "0xdeadbe",
        "dead beef",
        "deadbeeg",
    ] {
        assert_eq!(from_hex::<4>(bad), None, "{bad:?}");
    }
    // A multi-byte character is not a digit (and never splits a pair).
    assert_eq!(from_hex::<2>("é00"), None);
}
