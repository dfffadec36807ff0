//! Logging as kube-proxy users set it: `--v=N` (klog verbosity) and
//! `--logging-format=text|json`, or the KubeProxyConfiguration's
//! `logging.verbosity` and `logging.format` (flags win), mapped onto
//! tracing. RUST_LOG, when set, still decides the levels.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LoggingFormat {
    #[default]
    Text,
    Json,
}

/// The tracing filter for klog verbosity `v`, after the Kubernetes logging
/// conventions: up to 3 is what an operator needs (info), 4 is debug, 5
/// and more trace; other crates (the API client, wasmtime) stay at info
/// until 6, or their debug output would drown ours.
pub fn filter_for(v: Option<u8>) -> &'static str {
    match v {
        None | Some(0..=3) => "info",
        Some(4) => "info,kwp=debug",
        Some(5) => "info,kwp=trace",
        Some(_) => "debug,kwp=trace",
    }
}

/// `logging.verbosity` and `logging.format` of the `--config` file, read
/// before anything logs. A file that cannot be read or parsed gives
/// nothing here; the configuration proper reports it, naming it.
pub fn from_config(path: &std::path::Path) -> (Option<u8>, Option<LoggingFormat>) {
    let Some(file) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| crate::config::file::FileConfig::parse(&text).ok())
    else {
        return (None, None);
    };
    let Ok(Some(logging)) = file.section("logging") else {
        return (None, None);
    };
    let verbosity = logging
        .get("verbosity")
        .and_then(serde_yaml_ng::Value::as_u64)
        .map(|v| v.min(u64::from(u8::MAX)) as u8);
    let format = logging
        .get("format")
        .and_then(serde_yaml_ng::Value::as_str)
        .and_then(|f| LoggingFormat::from_str(f, true).ok());
    (verbosity, format)
}

/// Installs the global subscriber, writing to stderr.
pub fn init(v: Option<u8>, format: Option<LoggingFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| filter_for(v).into());
    // Colours only for a person at a terminal, not in the kubelet's logs.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format.unwrap_or_default() {
        LoggingFormat::Text => builder.init(),
        LoggingFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klog_verbosity_maps_to_tracing_levels() {
        assert_eq!(filter_for(None), "info");
        assert_eq!(filter_for(Some(2)), "info");
        assert_eq!(filter_for(Some(4)), "info,kwp=debug");
        assert_eq!(filter_for(Some(5)), "info,kwp=trace");
        assert_eq!(filter_for(Some(9)), "debug,kwp=trace");
    }
}
