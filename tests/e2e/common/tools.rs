//! The programs the tests run besides blkdelta, and what a test does when one is missing: it
//! skips loudly, naming the package that provides it, or, with `BLKDELTA_REQUIRE_TOOLS=1` (as
//! CI sets), fails. The checks are those of `blkdelta_common::testing`, which the crates'
//! own integration tests use too.

pub use blkdelta_common::testing::{cannot, have};
