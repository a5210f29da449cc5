//! The `ocifs` command line: parses arguments and the environment into typed values, builds
//! the pieces (registry client, source, cache), and calls the library. The only place that
//! reads the environment, prints to the user, or uses `anyhow`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
