//! The Wasm plugin runtime: one wasmtime Engine for the process, compiled
//! components cached by content hash, and sandboxed instances with a
//! deadline on every call and a memory cap.
//!
//! Plugins get no filesystem, sockets or environment: the WASI context is
//! empty and networking is switched off. Clocks and random numbers are
//! available (std needs them for HashMap seeds).

mod bindings;
mod catalog;
pub mod contract;
mod convert;
mod drive;
pub mod mode;
pub mod policy;
mod probation;
pub mod reload;
mod sandbox;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

pub use catalog::{Catalog, PluginSource};
pub use sandbox::PluginError;

/// A plugin version's identity: the SHA-256 of its component bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PluginDigest(pub [u8; 32]);

impl PluginDigest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

impl std::fmt::Display for PluginDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The two kinds of plugin the WIT contract defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginKind {
    /// Exports `kwp:mode/mode`: renders plans for a kernel or userspace.
    Mode,
    /// Exports `kwp:policy/policy`: chooses endpoints.
    Policy,
}

/// Bounds on every plugin instance.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Wall-clock budget of one call into a plugin...
    pub call_timeout: Duration,
    /// ...plus this much per element of the lists it is handed (endpoints),
    /// so that a Service of 20,000 endpoints, which Kubernetes allows, is
    /// rendered rather than refused. Rendering measures ~5 µs per endpoint
    /// (docs/plugins.md); the margin absorbs a loaded node.
    pub per_element: Duration,
    /// Linear memory an instance may grow to, in bytes.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_millis(100),
            per_element: Duration::from_micros(50),
            memory_bytes: 64 << 20,
        }
    }
}

/// How often the epoch advances; deadlines are whole ticks.
const EPOCH_TICK: Duration = Duration::from_millis(2);

/// Per-plugin counters, exported as metrics.
#[derive(Debug, Default)]
pub struct PluginStats {
    pub calls: AtomicU64,
    pub traps: AtomicU64,
    pub deadline_hits: AtomicU64,
    pub memory_hits: AtomicU64,
    pub instantiations: AtomicU64,
    /// Linear memory of the live instance, in bytes, as of its last call
    /// (Wasm memory never shrinks; heap profiles of the host miss it).
    pub memory_bytes: AtomicU64,
}

pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
    limits: Limits,
    compiled: Mutex<HashMap<PluginDigest, Component>>,
    ticker_stop: Arc<AtomicBool>,
    /// Digests of plugin versions rolled back after a reload: never loaded again.
    quarantined: Mutex<std::collections::HashSet<PluginDigest>>,
    pub reloads: ReloadStats,
}

/// Hot-reload counters, exported as metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub reloads: AtomicU64,
    pub rejections: AtomicU64,
    pub rollbacks: AtomicU64,
}

impl Runtime {
    pub fn new(limits: Limits) -> Result<Arc<Self>> {
        // Async calls (wasmtime 48 needs no `async_support` switch: it is
        // always on with the `async` feature) driven by `drive`; the epoch
        // bounds the guest's CPU time.
        let mut config = Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking WASI")?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (stop, ticking) = (ticker_stop.clone(), engine.clone());
        std::thread::Builder::new()
            .name("kwp-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .context("starting the epoch ticker")?;
        Ok(Arc::new(Self {
            engine,
            linker,
            limits,
            compiled: Mutex::default(),
            ticker_stop,
            quarantined: Mutex::default(),
            reloads: ReloadStats::default(),
        }))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles a component, or returns the cached compilation of the same
    /// bytes.
    pub fn compile(&self, bytes: &[u8]) -> Result<Component> {
        let digest = PluginDigest::of(bytes);
        if let Some(c) = self.compiled.lock().expect("cache lock").get(&digest) {
            return Ok(c.clone());
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(anyhow::Error::from)
            .context("compiling the component")?;
        self.compiled
            .lock()
            .expect("cache lock")
            .insert(digest, component.clone());
        Ok(component)
    }

    pub fn quarantine(&self, digest: PluginDigest) {
        self.quarantined
            .lock()
            .expect("quarantine lock")
            .insert(digest);
    }

    pub fn is_quarantined(&self, digest: &PluginDigest) -> bool {
        self.quarantined
            .lock()
            .expect("quarantine lock")
            .contains(digest)
    }

    /// What a compiled component is, from the interface it exports (never
    /// from its file name). The version is not checked here: a component
    /// of another contract version is then refused naming both versions.
    pub fn kind_of(&self, component: &Component) -> Result<PluginKind> {
        let exports = self.exports_of(component);
        let has = |kind| exports.iter().any(|e| contract::role(e) == Some(kind));
        match (has(PluginKind::Mode), has(PluginKind::Policy)) {
            (true, false) => Ok(PluginKind::Mode),
            (false, true) => Ok(PluginKind::Policy),
            _ => anyhow::bail!(
                "the component exports {exports:?}; a plugin exports exactly one of {} and {}",
                contract::interface(PluginKind::Mode),
                contract::interface(PluginKind::Policy)
            ),
        }
    }

    /// The names of a component's exports (`kwp:policy/policy@0.3.0`).
    pub fn exports_of(&self, component: &Component) -> Vec<String> {
        component
            .component_type()
            .exports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// Number of distinct components compiled so far.
    pub fn compiled_count(&self) -> usize {
        self.compiled.lock().expect("cache lock").len()
    }

    fn new_store(&self) -> wasmtime::Store<PluginState> {
        let mut store =
            wasmtime::Store::new(&self.engine, PluginState::new(self.limits.memory_bytes));
        store.limiter(|s| &mut s.limiter);
        // A trap rather than a yield: a guest spinning past its deadline is
        // stopped where it is, in the same poll, with no executor involved.
        store.epoch_deadline_trap();
        store
    }

    /// The deadline of a call handed `elements` list elements.
    fn deadline(&self, elements: usize) -> Duration {
        let elements = u32::try_from(elements).unwrap_or(u32::MAX);
        self.limits.call_timeout + self.limits.per_element.saturating_mul(elements)
    }

    fn deadline_ticks(&self, deadline: Duration) -> u64 {
        (deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// What a plugin's Store holds.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryCap,
    /// The guest's stderr (panic messages), read after a trap.
    stderr: MemoryOutputPipe,
}

impl PluginState {
    fn new(memory_bytes: usize) -> Self {
        let stderr = MemoryOutputPipe::new(8 << 10);
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryCap {
                max: memory_bytes,
                denied: false,
                grown: 0,
            },
            stderr,
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and remembers that it refused, so a trap that follows
/// (the guest aborting on a failed allocation) is reported as a memory hit.
struct MemoryCap {
    max: usize,
    denied: bool,
    /// Bytes of linear memory granted to the store's memories so far.
    grown: usize,
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.max;
        self.denied |= !ok;
        if ok {
            self.grown += desired.saturating_sub(current);
        }
        Ok(ok)
    }
    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}
