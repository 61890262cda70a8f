//! Integration tests: the real gateway on random ports against fake upstreams.
//! One test binary (modules below) so the crate links once.

mod support;

mod chat;
mod providers;
mod streaming;
