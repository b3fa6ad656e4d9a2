use std::process::ExitCode;

fn main() -> ExitCode {
    // The sandbox helper must take over before any thread exists (unshare of a user namespace
    // fails in a multi-threaded process), so it is checked before anything else runs.
    graven::sandbox::enter_if_helper();
    // An instance's shim is the same binary too; it needs no CLI parsing.
    graven::runtime::local::enter_if_shim();
    graven::cli::main()
}
