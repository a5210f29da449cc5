//! The integration test binary: real registry, real encoders, real FUSE mounts, and the
//! extract-and-compare oracle. Each test starts from a harness::Env; see harness.rs for what
//! CI=true requires.

mod builder;
mod harness;
mod oracle;

mod fixtures;
mod stats;

mod auth;
mod cli;
mod cli_browse;
mod cli_edges;
mod cli_tls;
mod conformance;
mod convert;
mod indexes;
mod laziness;
mod speculation;
mod verification;
