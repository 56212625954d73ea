//! NBD URIs as qemu-img and nbdinfo take them:
//!
//! ```text
//! nbd://HOST[:PORT]/EXPORT              TCP (port 10809 by default; an IPv6 host in brackets)
//! nbd+unix:///EXPORT?socket=PATH        a unix socket
//! ```
//!
//! The export name is the path after the first `/`, %-decoded; it may be empty (`nbd://host`,
//! `nbd+unix://?socket=PATH`). TLS (`nbds://`) and vsock are refused by name.

use std::fmt;
use std::path::PathBuf;

use crate::error::nbd::UriProblem;
use crate::error::NbdError;

/// The port NBD servers listen on by default.
pub const DEFAULT_PORT: u16 = 10809;

/// Longest export name the protocol allows, in bytes.
const MAX_EXPORT_BYTES: usize = 4096;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP host (a name, an IPv4 address or an IPv6 address without brackets) and port.
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// An NBD export: the server's address and the export's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub address: Address,
    /// The export's name (may be empty: the server's default export).
    pub export: String,
}

impl NbdUri {
    /// Whether `s` is meant as an NBD URI (its scheme starts with `nbd`), so that a source
    /// string is parsed as one, and refused as one when it is wrong.
    pub fn is_nbd(s: &str) -> bool {
        s.split_once("://")
            .is_some_and(|(scheme, _)| scheme.starts_with("nbd"))
    }

    /// Parses `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(uri: &str) -> Result<NbdUri, NbdError> {
        parse(uri).map_err(|problem| NbdError::Uri {
            uri: uri.to_string(),
            problem,
        })
    }
}

fn parse(uri: &str) -> Result<NbdUri, UriProblem> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| UriProblem::Scheme(String::new()))?;
    if rest.contains('#') {
        return Err(UriProblem::Unexpected("fragment ('#')"));
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i + 1..]),
        None => (before_query, ""),
    };
    if authority.contains('@') {
        return Err(UriProblem::Unexpected("user information ('@')"));
    }
    let export = decode(path)?;
    if export.len() > MAX_EXPORT_BYTES {
        return Err(UriProblem::ExportTooLong(export.len()));
    }
    let params = query.map(parse_query).transpose()?.unwrap_or_default();
    let address = match scheme {
        "nbd" | "nbd+tcp" => {
            if let Some((k, _)) = params.first() {
                return Err(UriProblem::Query(k.clone()));
            }
            tcp_address(authority)?
        }
        "nbd+unix" => unix_address(authority, params)?,
        other => return Err(UriProblem::Scheme(other.to_string())),
    };
    Ok(NbdUri { address, export })
}

/// `HOST[:PORT]`, `[V6]` or `[V6]:PORT`.
fn tcp_address(authority: &str) -> Result<Address, UriProblem> {
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or(UriProblem::Unexpected("'[' without ']'"))?;
        match after {
            "" => (host, None),
            p => match p.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(UriProblem::Port(p.to_string())),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(UriProblem::NoHost);
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&n| n > 0 && p.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| UriProblem::Port(p.to_string()))?,
    };
    Ok(Address::Tcp {
        host: decode(host)?,
        port,
    })
}

/// The socket of `nbd+unix://` (no host; `socket=PATH` the only parameter).
fn unix_address(authority: &str, params: Vec<(String, String)>) -> Result<Address, UriProblem> {
    if !authority.is_empty() {
        return Err(UriProblem::UnixHost(authority.to_string()));
    }
    let mut socket = None;
    for (k, v) in params {
        match k.as_str() {
            "socket" if socket.is_none() && !v.is_empty() => socket = Some(v),
            _ => return Err(UriProblem::Query(k)),
        }
    }
    socket
        .map(|s| Address::Unix(PathBuf::from(s)))
        .ok_or(UriProblem::NoSocket)
}

/// `k=v&k=v`, each %-decoded.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, UriProblem> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// %-decodes `s`, which must decode to UTF-8.
fn decode(s: &str) -> Result<String, UriProblem> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UriProblem::Escape(s.to_string()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriProblem::Escape(s.to_string()))
}

/// %-encodes what would not read back as the same path, query value or host.
fn encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl fmt::Display for NbdUri {
    /// The URI in its canonical form (default port left out), which parses back to `self`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = encode(&self.export, b"/:@!$&'()*+,;=");
        match &self.address {
            Address::Tcp { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    encode(host, b"")
                };
                write!(f, "nbd://{host}")?;
                if *port != DEFAULT_PORT {
                    write!(f, ":{port}")?;
                }
                write!(f, "/{export}")
            }
            Address::Unix(path) => {
                let socket = encode(&path.to_string_lossy(), b"/:@!$'()*+,;");
                write!(f, "nbd+unix:///{export}?socket={socket}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    fn unix(path: &str, export: &str) -> NbdUri {
        NbdUri {
            address: Address::Unix(path.into()),
            export: export.into(),
        }
    }

    #[test]
    fn nbd_uris_parse_as_qemu_takes_them() {
        let cases = [
            (
                "nbd://example.org/drive0",
                tcp("example.org", 10809, "drive0"),
            ),
            (
                "nbd://127.0.0.1:10810/drive0",
                tcp("127.0.0.1", 10810, "drive0"),
            ),
            ("nbd://host", tcp("host", 10809, "")),
            ("nbd://host/", tcp("host", 10809, "")),
            ("nbd://host//abs", tcp("host", 10809, "/abs")),
            ("nbd://[::1]:99/a%20b", tcp("::1", 99, "a b")),
            ("nbd://[::1]/x", tcp("::1", 10809, "x")),
            ("nbd+tcp://h/x", tcp("h", 10809, "x")),
            (
                "nbd+unix:///drive0?socket=/run/x.sock",
                unix("/run/x.sock", "drive0"),
            ),
            ("nbd+unix://?socket=/run/x.sock", unix("/run/x.sock", "")),
            ("nbd+unix:///?socket=/tmp/a%3Fb", unix("/tmp/a?b", "")),
            ("nbd+unix:///e/f?socket=rel.sock", unix("rel.sock", "e/f")),
        ];
        for (text, want) in cases {
            let got = NbdUri::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got, want, "{text}");
            let again = NbdUri::parse(&got.to_string()).unwrap();
            assert_eq!(again, want, "{text} → {got}");
        }
    }

    #[test]
    fn wrong_nbd_uris_are_refused_by_what_is_wrong() {
        let cases = [
            ("nbds://host/x", "scheme 'nbds'"),
            ("nbd+vsock://1/x", "scheme 'nbd+vsock'"),
            ("nbd:///x", "needs a host"),
            ("nbd://host:0/x", "port '0'"),
            ("nbd://host:65536/x", "port '65536'"),
            ("nbd://host:+1/x", "port '+1'"),
            ("nbd://[::1/x", "without ']'"),
            ("nbd://u@host/x", "user information"),
            ("nbd://host/x#y", "fragment"),
            ("nbd://host/x?socket=/s", "parameter 'socket'"),
            ("nbd+unix://host/x?socket=/s", "takes no host ('host')"),
            ("nbd+unix:///x", "needs ?socket=PATH"),
            ("nbd+unix:///x?socket=", "parameter 'socket'"),
            ("nbd+unix:///x?socket=/a&socket=/b", "parameter 'socket'"),
            ("nbd+unix:///x?socket=/s&tls=on", "parameter 'tls'"),
            ("nbd://host/%zz", "bad %-escape"),
            ("nbd://host/%ff", "bad %-escape"),
        ];
        for (text, want) in cases {
            let err = NbdUri::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {err}");
            assert!(err.contains(text), "{text}: {err}");
        }
        let long = format!("nbd://host/{}", "x".repeat(4097));
        assert!(NbdUri::parse(&long).is_err());
    }

    #[test]
    fn nbd_scheme_decides_what_is_a_uri() {
        assert!(NbdUri::is_nbd("nbd://h/x"));
        assert!(NbdUri::is_nbd("nbds://h/x"));
        assert!(!NbdUri::is_nbd("vm.qcow2@a..b"));
        assert!(!NbdUri::is_nbd("/dev/sda"));
    }
}
