//! The spec owns `graven.toml`: parsing it into a raw type that rejects unknown fields,
//! validating that into the typed `Project`, and reporting every problem at once with line,
//! column and field. Pure: it reads one file and touches nothing else.
