//! The contract between the proxier and every dataplane (in its own file so
//! that the IPVS VM probe can compile it without the other dataplanes).

use anyhow::Result;

use crate::model::ServicePortName;
use crate::plan::Fragment;

/// Which fragment: `None` is the node-wide base, `Some` a service port's.
pub type FragmentKey = Option<ServicePortName>;

/// The outcome of an apply that went through: every change is in force
/// except the `refused` ones, whose previous state stays.
#[derive(Debug, Default)]
pub struct Applied {
    pub refused: Vec<(FragmentKey, anyhow::Error)>,
}

impl Applied {
    /// Everything in force.
    pub fn all() -> Self {
        Self::default()
    }
}

/// The kernel or userspace side: applies fragment deltas.
pub trait Dataplane: Send {
    /// `changed` maps a service port to its new fragment, or `None` when it
    /// is gone. `base` is `Some` when the base fragment changed. `Err`
    /// means nothing was applied; a dataplane that can apply changes one
    /// by one reports the ones it could not in `Applied::refused`.
    fn apply(
        &mut self,
        base: Option<&Fragment>,
        changed: &[(ServicePortName, Option<&Fragment>)],
    ) -> Result<Applied>;

    /// Like `apply`, but all or nothing: a reloaded mode's first sync is
    /// judged whole, so none of a bad version's rules may land.
    fn apply_all(
        &mut self,
        base: Option<&Fragment>,
        changed: &[(ServicePortName, Option<&Fragment>)],
    ) -> Result<()> {
        let applied = self.apply(base, changed)?;
        match applied.refused.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Re-applies the whole current state, repairing anything changed
    /// behind the proxy's back. Called every syncPeriod.
    fn resync(&mut self) -> Result<()> {
        Ok(())
    }

    /// How long until `repair_drift` should run again; `None` when this
    /// dataplane has nothing to watch.
    fn drift_check_interval(&self) -> Option<std::time::Duration> {
        None
    }

    /// Checks cheaply whether rules were removed behind the proxy's back
    /// and, if so, re-applies everything at once: `Ok(true)` when it did.
    fn repair_drift(&mut self) -> Result<bool> {
        Ok(false)
    }
}

/// One change: a fragment's new contents, or `None` when it goes.
pub(crate) type Change<'a> = (FragmentKey, Option<&'a Fragment>);

/// An apply's changes as one list: the base first, then the services.
pub(crate) fn changes<'a>(
    base: Option<&'a Fragment>,
    changed: &'a [(ServicePortName, Option<&'a Fragment>)],
) -> Vec<Change<'a>> {
    base.map(|b| (None, Some(b)))
        .into_iter()
        .chain(changed.iter().map(|(n, f)| (Some(n.clone()), *f)))
        .collect()
}

/// A dataplane that applies nothing (`--dry-run`).
pub struct NoDataplane;

impl Dataplane for NoDataplane {
    fn apply(
        &mut self,
        _: Option<&Fragment>,
        _: &[(ServicePortName, Option<&Fragment>)],
    ) -> Result<Applied> {
        Ok(Applied::all())
    }
}
