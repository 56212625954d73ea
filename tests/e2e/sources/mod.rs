//! Change sources other than internal snapshots: dirty bitmaps, backing chains, two raw files
//! compared, and change maps.

mod bitmap;
mod chain;
mod compare;
mod maps;
