//! Integration tests, compiled as one binary.

mod bootstrap;
mod common;
mod emulator;
mod fakes;
mod mocks;
mod sqs;
