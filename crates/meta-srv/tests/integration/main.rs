//! meta-srv's integration tests: one test binary, one module per area.

mod bad_input;
mod durability;
mod in_process;
mod metactl;
mod support;
