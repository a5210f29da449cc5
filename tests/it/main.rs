//! The integration test binary: real registry, real encoders, real FUSE mounts, and the
//! extract-and-compare oracle. Each test starts from a harness::Env; see harness.rs for what
//! CI=true requires.

mod builder;
mod faults;
mod harness;
mod hostile;
mod link;
mod oracle;

mod fixtures;
mod stats;

mod auth;
mod browse;
mod cli;
mod cli_browse;
mod cli_edges;
mod cli_tls;
mod conformance;
mod connections;
mod convert;
mod fuzz_seeds;
mod healing;
mod help;
mod indexes;
mod laziness;
mod library;
mod mirrors;
mod network;
mod packet_link;
mod podman;
mod podman_env;
mod restart;
mod run;
mod scheduling;
mod speculation;
mod store;
mod verification;
