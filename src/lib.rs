//! ocifs: container images from a registry as a lazily loaded, read-only file system.
//!
//! Data flow, one module each: [`reference`](mod@reference) -> [`registry`] (HTTP, auth) -> [`blob`] (the byte
//! seam and its block cache) -> [`layer`] (one module per format, one index type) ->
//! [`tree`] (layers merged with whiteouts) -> [`image`] (resolved manifest, opened layers,
//! tree) -> [`serve`] (the FUSE-free read path of a mount, beside [`speculate`], which fetches
//! what the next reads will need) -> [`fuse`] (the thin kernel adapter) -> [`daemon`] (starting
//! a mount, as a library). [`store`] serves layers one by one instead, as a containers/storage
//! additional layer store (podman); `daemon::run` starts an image's command on a mount, as a
//! runtime would. [`verify`] gates trust; [`config`] and [`error`] are the
//! typed edges.

pub mod blob;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod digest;
pub mod error;
pub mod fuse;
// Fuzz targets (`fuzz/`, `scripts/fuzz`): not API, hidden from the docs.
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod layer;
pub mod reference;
pub mod registry;
pub mod serve;
pub mod speculate;
pub mod stats;
pub mod store;
pub mod task;
pub mod tree;
pub mod verify;

pub use error::{Error, Result};
