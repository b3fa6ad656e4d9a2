use std::process::ExitCode;

fn main() -> ExitCode {
    // The sandbox helper must take over before any thread exists (unshare of a user namespace
    // fails in a multi-threaded process), so it is checked before anything else runs.
    graven::sandbox::enter_if_helper();
    graven::cli::main()
}
