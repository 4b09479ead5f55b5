//! Test harnesses: the gateway started in-process ([`TestGateway`], most tests, on
//! tokio's paused clock), the real binary ([`Binary`]) and a MongoDB ([`mongo`]).
#![allow(dead_code)]

pub mod binary;
pub mod inproc;
pub mod mongo;

#[allow(unused_imports)]
pub use binary::{failed_reason, repo_file, Binary, Peer as BlockingPeer, TIMEOUT};
#[allow(unused_imports)]
pub use inproc::{Peer, TestGateway};
