//! The contract this host speaks: one version of each WIT package of
//! `sdk/wit/` (see `crate::version`), and what to say about a component
//! built against another.

use super::PluginKind;

/// The version of package `kwp:<name>` the host speaks, e.g.
/// `kwp:policy@0.3.0`.
pub fn package(name: &str) -> String {
    let prefix = format!("kwp:{name}@");
    crate::version::wit_packages()
        .into_iter()
        .find(|p| p.starts_with(&prefix))
        .unwrap_or_else(|| format!("kwp:{name}"))
}

/// The interface a plugin of `kind` exports, with the version the host
/// speaks: `kwp:policy/policy@0.3.0`.
pub fn interface(kind: PluginKind) -> String {
    let name = role_name(kind);
    let package = package(name);
    match package.split_once('@') {
        Some((pkg, version)) => format!("{pkg}/{name}@{version}"),
        None => format!("{package}/{name}"),
    }
}

fn role_name(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Mode => "mode",
        PluginKind::Policy => "policy",
    }
}

fn world(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Mode => "proxy-mode",
        PluginKind::Policy => "policy-plugin",
    }
}

/// What an exported interface is for: `policy` or `mode` of any `kwp:`
/// package at any version, so that a component of another contract
/// version (the single `kwp:proxy` package before 0.3.0 among them) is
/// recognised, then refused naming its version rather than "exports
/// nothing".
pub fn role(export: &str) -> Option<PluginKind> {
    let name = export.split('@').next()?;
    let (package, interface) = name.split_once('/')?;
    if !package.starts_with("kwp:") {
        return None;
    }
    match interface {
        "mode" => Some(PluginKind::Mode),
        "policy" => Some(PluginKind::Policy),
        _ => None,
    }
}

/// Why a component exporting `exports` does not link as a `kind` plugin:
/// the expected version and the one it was built against, when that is
/// the difference. Otherwise the error's cause (from wasmtime) names what
/// is missing.
pub fn refusal(name: &str, kind: PluginKind, exports: &[String]) -> String {
    let expected = interface(kind);
    let head = format!(
        "plugin {name} does not implement the {} world of {}",
        world(kind),
        package(role_name(kind))
    );
    match exports.iter().find(|e| role(e) == Some(kind)) {
        Some(found) if *found != expected => format!(
            "{head}: it was built against {found}, this host speaks {expected}; \
             rebuild it with a kwp-sdk of that contract"
        ),
        Some(_) => head,
        None => format!("{head}: it exports {exports:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_speaks_one_version_of_each_package() {
        for (kind, prefix) in [
            (PluginKind::Policy, "kwp:policy/policy@"),
            (PluginKind::Mode, "kwp:mode/mode@"),
        ] {
            let i = interface(kind);
            let version = i.strip_prefix(prefix).unwrap_or_else(|| panic!("{i}"));
            assert_eq!(version.split('.').count(), 3, "{i}");
        }
        assert!(package("types").starts_with("kwp:types@"));
    }

    #[test]
    fn roles_are_told_by_interface_name_at_any_version() {
        assert_eq!(role("kwp:policy/policy@0.0.9"), Some(PluginKind::Policy));
        assert_eq!(role("kwp:proxy/policy@0.2.0"), Some(PluginKind::Policy));
        assert_eq!(role("kwp:mode/mode@9.0.0"), Some(PluginKind::Mode));
        assert_eq!(role("kwp:types/types@0.3.0"), None);
        assert_eq!(role("acme:x/policy@1.0.0"), None);
        assert_eq!(role("wasi:cli/run@0.2.0"), None);
    }

    #[test]
    fn a_refusal_names_the_expected_and_the_found_version() {
        let msg = refusal(
            "old",
            PluginKind::Policy,
            &["kwp:proxy/policy@0.2.0".to_string()],
        );
        assert!(msg.contains("kwp:proxy/policy@0.2.0"), "{msg}");
        assert!(msg.contains(&interface(PluginKind::Policy)), "{msg}");
        // The right version: the cause says what is missing.
        let same = refusal("p", PluginKind::Policy, &[interface(PluginKind::Policy)]);
        assert!(!same.contains("built against"), "{same}");
        let other = refusal("rr", PluginKind::Mode, &[interface(PluginKind::Policy)]);
        assert!(other.contains("proxy-mode world of kwp:mode@"), "{other}");
        assert!(other.contains("kwp:policy/policy@"), "{other}");
    }
}
