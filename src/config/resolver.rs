//! The state of one resolution, shared by the files that resolve each section: the errors
//! collected so far, the device models loaded (each once), the environment.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use super::diagnostic::Diagnostic;
use super::points::PointSpec;
use super::raw::RawBus;
use super::{Bus, Gateway};

/// One resolution in progress.
pub(super) struct Resolver<'e> {
    pub(super) errors: Vec<Diagnostic>,
    /// What works but is probably not meant (printed by `check`, logged at start).
    pub(super) warnings: Vec<Diagnostic>,
    /// Model name → validated points (or None if the model file had errors).
    pub(super) models: HashMap<String, Option<ModelDef>>,
    pub(super) env: &'e dyn Fn(&str) -> Option<String>,
}

/// What resolving a device needs from the rest of the config.
#[derive(Clone, Copy)]
pub(super) struct DeviceEnv<'a> {
    pub(super) gateway: &'a Gateway,
    /// Every bus named in the file, valid or not (so a device is not told its bus is unknown
    /// when the bus only has an error of its own).
    pub(super) buses: &'a BTreeMap<String, RawBus>,
    pub(super) resolved: &'a [Bus],
    pub(super) folders: &'a [PathBuf],
}

/// A device model, validated once per config.
#[derive(Debug, Clone)]
pub(super) struct ModelDef {
    pub(super) points: Vec<PointSpec>,
    /// The points as the model alone resolves them (computed points bound), for `check`.
    pub(super) resolved: Vec<crate::mapping::Point>,
    pub(super) computed: Vec<super::Computed>,
    pub(super) parser: Option<crate::parse::Parser>,
    pub(super) request: Option<String>,
}

impl<'e> Resolver<'e> {
    pub(super) fn new(env: &'e dyn Fn(&str) -> Option<String>) -> Resolver<'e> {
        Resolver {
            errors: Vec::new(),
            warnings: Vec::new(),
            models: HashMap::new(),
            env,
        }
    }
}
