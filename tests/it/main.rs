//! Integration tests, compiled as one binary.

mod bootstrap;
mod common;
mod dead_letter;
mod emulator;
mod envelopes;
mod events;
mod fakes;
mod iam;
mod mocks;
mod sqs;
mod template;
