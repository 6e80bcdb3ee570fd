//! The simulated crowd: a library so the `crowd` binary and the end-to-end tests drive
//! fairgate the same way, over real HTTP and websockets.

pub mod bench;
pub mod client;
pub mod crowd;
pub mod html;
pub mod invariants;
pub mod verify;
