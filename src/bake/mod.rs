//! Bake owns turning a Containerfile and its context into an image in the store: parsing the
//! Containerfile, planning the steps, building reproducible layers, and the layer cache.
//! It writes only through `store` and runs RUN steps only through `sandbox`; it knows nothing
//! of instances, services or deploys.
