//! One sandboxed plugin instance: calls run under a deadline, and an
//! instance that traps is thrown away and re-created on the next call,
//! never reused.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use wasmtime::Store;

use super::{PluginState, PluginStats, Runtime, drive};

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {plugin}: {call} exceeded its {timeout_ms} ms deadline")]
    Deadline {
        plugin: String,
        call: &'static str,
        timeout_ms: u128,
    },
    #[error("plugin {plugin}: {call} hit the {limit_mib} MiB memory cap")]
    Memory {
        plugin: String,
        call: &'static str,
        limit_mib: usize,
    },
    #[error("plugin {plugin}: {call} trapped: {reason}")]
    Trap {
        plugin: String,
        call: &'static str,
        reason: String,
    },
    #[error("plugin {plugin}: instantiation failed: {reason}")]
    Instantiate { plugin: String, reason: String },
    #[error("plugin {plugin}: {call} returned an error: {message}")]
    Rejected {
        plugin: String,
        call: &'static str,
        message: String,
    },
}

/// Makes a configured instance in a store; a future, like every call (see
/// `drive`).
type Instantiate<B> = Box<
    dyn for<'a> Fn(
            &'a mut Store<PluginState>,
        ) -> Pin<Box<dyn Future<Output = wasmtime::Result<B>> + 'a>>
        + Send
        + Sync,
>;

pub struct Sandbox<B> {
    pub name: String,
    runtime: Arc<Runtime>,
    instantiate: Instantiate<B>,
    live: Option<(Store<PluginState>, B)>,
    pub stats: Arc<PluginStats>,
}

impl<B> Sandbox<B> {
    pub fn new(name: &str, runtime: Arc<Runtime>, instantiate: Instantiate<B>) -> Self {
        Self {
            name: name.into(),
            runtime,
            instantiate,
            live: None,
            stats: Arc::default(),
        }
    }

    /// Makes sure an instance exists; `true` if it was just created (the
    /// caller then replays configuration and state into it).
    pub fn ensure(&mut self) -> Result<bool, PluginError> {
        if self.live.is_some() {
            return Ok(false);
        }
        let mut store = self.runtime.new_store();
        let deadline = self.runtime.deadline(0);
        store.set_epoch_deadline(self.runtime.deadline_ticks(deadline));
        let reason = match drive::run((self.instantiate)(&mut store), deadline) {
            Ok(Ok(bindings)) => {
                self.stats.instantiations.fetch_add(1, Ordering::Relaxed);
                self.live = Some((store, bindings));
                return Ok(true);
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(overrun) => format!(
                "still waiting after {} ms, past its {} ms deadline",
                overrun.waited.as_millis(),
                deadline.as_millis()
            ),
        };
        Err(PluginError::Instantiate {
            plugin: self.name.clone(),
            reason,
        })
    }

    /// Runs one call, handed `elements` list elements, under the deadline
    /// for that size. Any trap discards the instance. The guest's CPU time
    /// is bounded by the epoch deadline (a trap); the time it spends
    /// waiting on WASI by `drive`'s budget of the same length.
    pub fn call<R>(
        &mut self,
        call: &'static str,
        elements: usize,
        f: impl AsyncFnOnce(&mut Store<PluginState>, &B) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        self.ensure()?;
        let (store, bindings) = self.live.as_mut().expect("ensured");
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let deadline = self.runtime.deadline(elements);
        store.set_epoch_deadline(self.runtime.deadline_ticks(deadline));
        let result = drive::run(f(store, bindings), deadline);
        let grown = store.data().limiter.grown as u64;
        self.stats.memory_bytes.store(grown, Ordering::Relaxed);
        match result {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(err)) => Err(self.discard(call, deadline, Some(err))),
            Err(overrun) => {
                tracing::warn!(
                    plugin = self.name,
                    call,
                    waited_ms = overrun.waited.as_millis(),
                    "the guest was still waiting on WASI (a clock or poll) at its deadline"
                );
                Err(self.discard(call, deadline, None))
            }
        }
    }

    /// Throws the instance away after a failed call and says why: `err` is
    /// the trap, `None` a call that overran its deadline while waiting.
    fn discard(
        &mut self,
        call: &'static str,
        deadline: Duration,
        err: Option<wasmtime::Error>,
    ) -> PluginError {
        let (mut store, _) = self.live.take().expect("a call had an instance");
        self.stats.traps.fetch_add(1, Ordering::Relaxed);
        let plugin = self.name.clone();
        let interrupted = err.as_ref().is_none_or(|e| {
            matches!(
                e.downcast_ref::<wasmtime::Trap>(),
                Some(wasmtime::Trap::Interrupt)
            )
        });
        let error = if interrupted {
            self.stats.deadline_hits.fetch_add(1, Ordering::Relaxed);
            PluginError::Deadline {
                plugin,
                call,
                timeout_ms: deadline.as_millis(),
            }
        } else if store.data().limiter.denied {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            PluginError::Memory {
                plugin,
                call,
                limit_mib: self.runtime.limits().memory_bytes >> 20,
            }
        } else {
            let stderr = String::from_utf8_lossy(&store.data_mut().stderr.contents())
                .trim()
                .to_string();
            let err = err.map_or_else(String::new, |e| format!("{e:#}"));
            let reason = if stderr.is_empty() {
                err
            } else {
                format!("{err}; guest said: {stderr}")
            };
            PluginError::Trap {
                plugin,
                call,
                reason,
            }
        };
        tracing::warn!(%error, "plugin instance discarded");
        error
    }
}
