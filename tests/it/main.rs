//! Integration tests: the real gateway on random ports against fake upstreams.
//! One test binary (modules below) so the crate links once.

mod support;

mod access;
mod bad_input;
mod batch_store;
mod batches;
mod budgets;
mod chat;
mod config_reload;
mod durability;
mod hygiene;
mod multi_instance;
mod observability;
mod providers;
mod resilience;
mod sdk;
mod store_conformance;
mod streaming;
