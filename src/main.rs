use std::process::ExitCode;

/// The proxy allocates a few buffers per request (hyper's read buffers, header maps); mimalloc
/// makes that markedly cheaper than glibc's allocator (bench/proxy.sh).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The sandbox helper must take over before any thread exists (unshare of a user namespace
    // fails in a multi-threaded process), so it is checked before anything else runs.
    graven::sandbox::enter_if_helper();
    graven::cli::main()
}
