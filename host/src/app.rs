//! Wiring: settings -> plugin runtime -> proxier -> source -> sync loop.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

use crate::config::{Flags, ProxyMode, Settings};
use crate::dataplane::iptables::IptablesDataplane;
use crate::dataplane::nftables::NftDataplane;
use crate::dataplane::userspace::backends::Backends;
use crate::dataplane::userspace::{Mapping, Redirector, UserspaceDataplane};
use crate::dataplane::{Dataplane, NoDataplane};
use crate::plugin::mode::{Mode, ModeSettings};
use crate::plugin::{Catalog, Limits, Runtime};
use crate::proxier::Proxier;
use crate::source::file::FileSource;
use crate::state::ClusterState;
use crate::sync::SyncLoop;

/// A proxy ready to run.
pub struct App {
    pub settings: Settings,
    pub sync: SyncLoop,
    /// Userspace mode's listener map.
    pub mapping: Option<Mapping>,
    source: Source,
    /// Whether this instance writes kernel rules (and so takes the node lock).
    kernel_rules: bool,
}

enum Source {
    File(Box<FileSource>),
    Kubernetes,
}

impl App {
    pub fn build(flags: &Flags) -> Result<Self> {
        let settings = Settings::resolve(flags)?;
        let source_spec = crate::source::parse(&settings.source)?;
        if !matches!(
            settings.mode,
            ProxyMode::Userspace | ProxyMode::Nftables | ProxyMode::Iptables | ProxyMode::Ipvs
        ) {
            bail!(
                "proxy mode {} is not available; use --proxy-mode userspace, nftables, iptables or ipvs",
                settings.mode.as_str()
            );
        }
        let mut limits = Limits::default();
        limits.call_timeout = flags.plugin_call_timeout.unwrap_or(limits.call_timeout);
        let runtime = Runtime::new(limits)?;
        let catalog = Catalog::new(settings.plugin_dir.clone());
        let (source, bytes) = catalog.load(settings.mode.as_str())?;
        let component = runtime
            .compile(&bytes)
            .with_context(|| format!("mode plugin {source}"))?;
        let mode_settings = ModeSettings {
            table: crate::plan::Rules::default().nft_table,
            masquerade_all: settings.masquerade_all,
            detect_local: settings.detect_local.clone(),
            node_port_addresses: settings.node_port_addresses.clone(),
            extra: settings.mode_extra.clone(),
            ..ModeSettings::default()
        };
        let mode = Mode::new(
            runtime.clone(),
            settings.mode.as_str(),
            &component,
            mode_settings.clone(),
        )?;
        tracing::info!(mode = settings.mode.as_str(), %source, "loaded proxy mode");
        let mut userspace_backends = None;
        let mut iptables_metrics = None;
        let mut kernel_rules = !settings.dry_run && settings.mode != ProxyMode::Userspace;
        if kernel_rules
            && matches!(settings.mode, ProxyMode::Nftables | ProxyMode::Ipvs)
            && !crate::dataplane::tool::on_path("nft")
        {
            // Not fatal: the rules are written once it is installed.
            tracing::error!(
                "nft is not installed (not on PATH): no rules are written until it is; every sync fails and is retried, and /healthz turns 503 once a change has waited 2 x syncPeriod"
            );
        }
        let (dataplane, mapping): (Box<dyn Dataplane>, _) = if settings.dry_run {
            (Box::new(NoDataplane), None)
        } else if settings.mode == ProxyMode::Nftables {
            (
                Box::new(NftDataplane::new(&crate::plan::Rules::default().nft_table)),
                None,
            )
        } else if settings.mode == ProxyMode::Ipvs {
            (Box::new(ipvs_dataplane(&settings)), None)
        } else if settings.mode == ProxyMode::Iptables {
            let dp = IptablesDataplane::new();
            iptables_metrics = Some(dp.metrics.clone());
            (Box::new(dp), None)
        } else {
            let redirector = if flags.no_redirect {
                None
            } else {
                Redirector::detect()
            };
            let bind = match (&redirector, flags.userspace_bind_address) {
                (Some(_), None) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                _ => settings.userspace_bind_address,
            };
            kernel_rules = redirector.is_some();
            if redirector.is_none() {
                tracing::info!(%bind, "no CAP_NET_ADMIN: listeners only, no cluster IP redirection");
            }
            let backends = Arc::new(Backends::default());
            let dp = UserspaceDataplane::new(bind, backends.clone(), redirector);
            userspace_backends = Some(backends);
            let mapping = dp.mapping();
            (Box::new(dp), Some(mapping))
        };
        let mut proxier = Proxier::new(
            runtime,
            catalog,
            mode,
            mode_settings,
            &settings.lb_policy,
            userspace_backends,
            dataplane,
        )?;
        if settings.dry_run {
            proxier.explain_plan();
        } else {
            proxier.enable_health_checks();
            if settings.mode != ProxyMode::Userspace {
                proxier.enable_conntrack_cleanup();
            }
        }
        let configz = serde_json::json!({
            "kubeproxy.config.k8s.io": {
                "mode": settings.mode.as_str(),
                "hostnameOverride": settings.hostname,
                "healthzBindAddress": settings.healthz_bind_address.map(|a| a.to_string()).unwrap_or_default(),
                "metricsBindAddress": settings.metrics_bind_address.map(|a| a.to_string()).unwrap_or_default(),
                "syncPeriod": format!("{:?}", settings.sync_period),
                "minSyncPeriod": format!("{:?}", settings.min_sync_period),
                "clusterCIDR": settings.cluster_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            },
            "kube-wasm-proxy": { "source": settings.source, "lbPolicy": settings.lb_policy },
        })
        .to_string();
        let mut metrics =
            crate::metrics::Metrics::new(settings.mode.as_str(), settings.sync_period, configz);
        metrics.runtime = Some(proxier.runtime());
        metrics.iptables = iptables_metrics;
        metrics.inspect = proxier.inspect.clone();
        let sync = SyncLoop {
            state: ClusterState::new(&settings.hostname)
                .with_node_port_range(settings.node_port_range.clone()),
            proxier,
            min_sync_period: settings.min_sync_period,
            sync_period: settings.sync_period,
            reloads: None,
            metrics: Arc::new(metrics),
            synced: Vec::new(),
        };
        let source = match source_spec {
            crate::source::Spec::File(dir) => {
                Source::File(Box::new(FileSource::new(&dir, &settings.hostname)))
            }
            crate::source::Spec::Kubernetes => Source::Kubernetes,
        };
        Ok(Self {
            settings,
            sync,
            mapping,
            source,
            kernel_rules,
        })
    }

    /// Reads the source once and syncs what changed (benchmarks, dry runs).
    pub fn scan_and_sync(&mut self) -> Result<()> {
        let Source::File(source) = &mut self.source else {
            bail!("--dry-run reads --source file:DIR only")
        };
        let sync = &mut self.sync;
        source.read_now(&mut |event| {
            sync.apply(event);
            Ok(())
        })?;
        self.sync.sync();
        Ok(())
    }

    /// `--dry-run`: read the source once, render, print the plan (and in
    /// nftables, iptables and IPVS mode what it would change in the kernel).
    pub fn dry_run(mut self) -> Result<String> {
        self.scan_and_sync()?;
        let plan = self.sync.proxier.plan();
        let mut out = plan.to_string();
        if self.settings.mode == ProxyMode::Nftables {
            out.push_str("\n# diff against the kernel\n");
            match crate::dataplane::nftables::diff_against_kernel(
                &crate::plan::Rules::default().nft_table,
                plan,
            ) {
                Ok(diff) => out.push_str(&diff),
                Err(e) => out.push_str(&format!("# cannot compute the diff: {e:#}\n")),
            }
        }
        if self.settings.mode == ProxyMode::Ipvs {
            // The packet-filter part, checked by nft in a scratch namespace.
            out.push_str("\n# packet filter: diff against the kernel\n");
            match crate::dataplane::nftables::diff_against_kernel(
                &crate::plan::Rules::default().nft_table,
                &crate::dataplane::ipvs::filter_plan(plan),
            ) {
                Ok(diff) => out.push_str(&diff),
                Err(e) => out.push_str(&format!("# cannot compute the diff: {e:#}\n")),
            }
        }
        if self.settings.mode == ProxyMode::Iptables {
            out.push_str("\n# diff against the kernel\n");
            match crate::dataplane::iptables::diff_against_kernel(plan) {
                Ok(diff) => out.push_str(&diff),
                Err(e) => out.push_str(&format!("# cannot compute the diff: {e:#}\n")),
            }
        }
        Ok(out)
    }

    /// The plugin runtime (its reload counters).
    pub fn runtime(&self) -> Arc<Runtime> {
        self.sync.proxier.runtime()
    }

    /// Runs until interrupted.
    pub async fn run(mut self) -> Result<()> {
        // Held until this future ends; the kernel frees it if the process dies.
        let _lock = if self.kernel_rules {
            Some(crate::instance_lock::InstanceLock::acquire(
                crate::instance_lock::NODE_RULES_LOCK,
            )?)
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(1024);
        match std::mem::replace(&mut self.source, Source::Kubernetes) {
            Source::File(source) => {
                // A thread of its own: never on the event loop that serves
                // health, metrics and signals.
                (*source)
                    .spawn(
                        tx,
                        self.sync.metrics.source_errors.clone(),
                        self.sync.metrics.source_files_read.clone(),
                    )
                    .context("starting the file source")?;
            }
            Source::Kubernetes => {
                let client =
                    crate::source::kubernetes::client(self.settings.kubeconfig.as_ref()).await?;
                let errors = self.sync.metrics.source_errors.clone();
                tokio::spawn(crate::source::kubernetes::run(
                    client,
                    self.settings.hostname.clone(),
                    tx,
                    errors,
                ));
            }
        }
        for (addr, healthz) in [
            (self.settings.healthz_bind_address, true),
            (self.settings.metrics_bind_address, false),
        ] {
            if let Some(addr) = addr {
                let metrics = self.sync.metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = crate::metrics::serve(addr, metrics, healthz).await {
                        tracing::error!(%addr, error = format!("{e:#}"), "health/metrics server stopped");
                    }
                });
            }
        }
        if let Some(dir) = self
            .sync
            .proxier
            .catalog()
            .dir()
            .map(std::path::Path::to_path_buf)
        {
            let (reload_tx, reload_rx) = mpsc::channel(4);
            self.sync.reloads = Some(reload_rx);
            tokio::spawn(watch_plugins(dir, self.sync.proxier.runtime(), reload_tx));
        }
        self.sync.run(rx).await;
        anyhow::bail!("the state source stopped")
    }
}

pub async fn run(flags: Flags) -> Result<()> {
    crate::dataplane::tool::configure(crate::dataplane::tool::Scaling::from_flags(
        flags.kernel_tool_timeout,
        flags.kernel_tool_timeout_per_line,
    )?);
    if flags.cleanup || flags.cleanup_kube_proxy {
        return crate::cleanup::run(crate::cleanup::Scope {
            kwp: flags.cleanup,
            kube_proxy: flags.cleanup_kube_proxy,
        });
    }
    let app = App::build(&flags)?;
    if app.settings.dry_run {
        print!("{}", app.dry_run()?);
        return Ok(());
    }
    tracing::info!(
        mode = app.settings.mode.as_str(),
        source = app.settings.source,
        node = app.settings.hostname,
        "kube-wasm-proxy starting"
    );
    if !app.settings.conntrack.is_empty() {
        let sysctls = &mut crate::conntrack_sysctls::ProcSysctls;
        crate::conntrack_sysctls::apply(&app.settings.conntrack, sysctls);
    }
    tokio::select! {
        r = app.run() => r,
        signal = shutdown_signal() => {
            tracing::info!(signal, "exiting");
            Ok(())
        }
    }
}

/// Hot reload: polls the plugin directory, and re-reads it all on SIGHUP;
/// each changed plugin is compiled and probed on a blocking thread, off
/// the sync path, and only a passing candidate goes to the sync loop.
async fn watch_plugins(
    dir: std::path::PathBuf,
    runtime: Arc<Runtime>,
    tx: mpsc::Sender<crate::plugin::reload::Candidate>,
) {
    use crate::plugin::reload::{Watcher, candidate_from_file};
    let mut watcher = Watcher::new(&dir);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: re-reading every plugin");
                watcher.forget();
            }
        }
        for (name, path) in watcher.changed() {
            let rt = runtime.clone();
            let checked =
                tokio::task::spawn_blocking(move || candidate_from_file(&rt, &name, &path)).await;
            if let Ok(Some(candidate)) = checked
                && tx.send(candidate).await.is_err()
            {
                return;
            }
        }
    }
}

/// SIGINT or SIGTERM (what the kubelet sends).
pub async fn shutdown_signal() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// IPVS mode's dataplane: IPVS over netlink, the host-applied `ipvs`
/// settings, and the nftables dataplane on kwp's own table for the packet
/// filter items (docs/ipvs.md).
fn ipvs_dataplane(settings: &Settings) -> crate::dataplane::ipvs::IpvsDataplane {
    use crate::dataplane::ipvs::{IpvsDataplane, IpvsSettings, Timeouts};
    let secs = |d: std::time::Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let host = settings.ipvs.as_ref().map(|s| IpvsSettings {
        strict_arp: s.strict_arp,
        timeouts: Timeouts {
            tcp: secs(s.tcp_timeout),
            tcp_fin: secs(s.tcp_fin_timeout),
            udp: secs(s.udp_timeout),
        },
        exclude_cidrs: s.exclude_cidrs.clone(),
    });
    IpvsDataplane::new()
        .with_settings(host.unwrap_or_default())
        .with_filter(Box::new(NftDataplane::new(
            &crate::plan::Rules::default().nft_table,
        )))
}
