//! The API owns the daemon's local HTTP interface over a unix socket (owner-only), its
//! routes and the mapping of errors to status codes, and the client the CLI uses.
