use std::process::ExitCode;

/// The proxy allocates a few buffers per request (hyper's read buffers, header maps); mimalloc
/// (built without transparent huge pages, see ARCHITECTURE.md)
/// makes that markedly cheaper than glibc's allocator (bench/proxy.sh).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A graven started by a serving graven (a shim, the sandbox helper, a RUN step's or an
    // exec's helper, a nested command) puts back the descriptor limit the serving one was
    // given before it raised its own, so that workloads never inherit the raised limit.
    graven::proxy::limits::restore_started_nofile();
    // The sandbox helper must take over before any thread exists (unshare of a user namespace
    // fails in a multi-threaded process), so it is checked before anything else runs.
    graven::sandbox::enter_if_helper();
    // An instance's shim is the same binary too; it needs no CLI parsing.
    graven::runtime::local::enter_if_shim();
    graven::runtime::local::net::enter_if_net();
    graven::cli::main()
}
