//! The subcommands of the `fieldgate` binary, one file each. `main.rs` parses the command line
//! and turns results into exit codes.

#[cfg(feature = "testkit")]
pub mod demo;
pub mod queue;
pub mod read;
pub mod run;
pub mod status;
