//! One sandboxed plugin instance: calls run under a deadline, and an
//! instance that traps is thrown away and re-created on the next call,
//! never reused.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use wasmtime::Store;

use super::{PluginState, PluginStats, Runtime};

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

type Instantiate<B> = Box<dyn Fn(&mut Store<PluginState>) -> wasmtime::Result<B> + Send + Sync>;

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
        let ticks = self.runtime.deadline_ticks(self.runtime.deadline(0));
        store.set_epoch_deadline(ticks);
        let bindings = off_the_async_workers(|| (self.instantiate)(&mut store)).map_err(|e| {
            PluginError::Instantiate {
                plugin: self.name.clone(),
                reason: format!("{e:#}"),
            }
        })?;
        self.stats.instantiations.fetch_add(1, Ordering::Relaxed);
        self.live = Some((store, bindings));
        Ok(true)
    }

    /// Runs one call, handed `elements` list elements, under the deadline
    /// for that size. Any trap discards the instance.
    pub fn call<R>(
        &mut self,
        call: &'static str,
        elements: usize,
        f: impl FnOnce(&mut Store<PluginState>, &B) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        self.ensure()?;
        let (store, bindings) = self.live.as_mut().expect("ensured");
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let deadline = self.runtime.deadline(elements);
        store.set_epoch_deadline(self.runtime.deadline_ticks(deadline));
        let result = off_the_async_workers(|| f(store, bindings));
        match result {
            Ok(r) => Ok(r),
            Err(err) => {
                let (mut store, _) = self.live.take().expect("ensured");
                self.stats.traps.fetch_add(1, Ordering::Relaxed);
                let plugin = self.name.clone();
                let limits = self.runtime.limits();
                let error = if matches!(
                    err.downcast_ref::<wasmtime::Trap>(),
                    Some(wasmtime::Trap::Interrupt)
                ) {
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
                        limit_mib: limits.memory_bytes >> 20,
                    }
                } else {
                    let stderr = String::from_utf8_lossy(&store.data_mut().stderr.contents())
                        .trim()
                        .to_string();
                    let reason = if stderr.is_empty() {
                        format!("{err:#}")
                    } else {
                        format!("{err:#}; guest said: {stderr}")
                    };
                    PluginError::Trap {
                        plugin,
                        call,
                        reason,
                    }
                };
                tracing::warn!(%error, "plugin instance discarded");
                Err(error)
            }
        }
    }
}

/// The calling model: Wasm runs synchronously, on the caller's thread. The
/// sync loop and the userspace data path live on tokio's worker threads, and
/// a worker must neither block (health and metrics share the workers) nor
/// enter the runtime again, which WASI's synchronous bindings do for a
/// guest's stdout or stderr (a panic message). On a worker the call runs in
/// `block_in_place`: the worker's other tasks move to another thread first.
/// The host runs the multi-thread runtime; elsewhere (tests, the blocking
/// pool) the call runs as is.
fn off_the_async_workers<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
