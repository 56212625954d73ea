//! Tests of the NBD client against scripted server bytes: a transcript builder ([`script`]),
//! the handshake, the replies of the transmission phase, mutated transcripts, and a hostile
//! server on a unix socket.

mod handshake;
mod hostile;
mod mutations;
mod replies;
pub(crate) mod script;
