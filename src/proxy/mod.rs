//! The proxy owns the identity layer: one HTTP listener per route, balancing over the
//! instances it is given, active health checks, draining, request holding and retries, and
//! per-release counters. It knows nothing of deploys, releases' meaning or the event log:
//! the controller hands it snapshots of backends and reads its health changes.
