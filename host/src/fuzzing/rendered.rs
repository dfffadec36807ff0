//! The `rendered_rules` target: Services, EndpointSlices and the Node
//! with hostile names and annotations (quotes, newlines, semicolons,
//! unicode, 63- and 253-character names), taken through the real path:
//! the cluster state (its checks), the bundled `nftables` and `iptables`
//! mode plugins, the plan validator, and the dataplanes writing their
//! text to a recording kernel. Every script written must pass the
//! independent reading in `confinement`: one command per line, kwp's own
//! table and chains only.
//!
//! The plugins are compiled once per process and the proxiers persist
//! across inputs (as on a node): each input replaces the whole object
//! set, so the previous input's Services are deleted through the same
//! path as a real deletion.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use arbitrary::{Result, Unstructured};
use serde_json::{Value, json};

use super::Recorder;
use super::confinement;
use crate::dataplane::iptables::IptablesDataplane;
use crate::dataplane::nftables::NftDataplane;
use crate::plan::Rules;
use crate::plugin::mode::{Mode, ModeSettings};
use crate::plugin::{Catalog, Runtime};
use crate::proxier::Proxier;
use crate::state::ClusterState;

const NODE: &str = "node-a";

/// Text that means something to nft, iptables-restore, a shell or a
/// terminal.
const HOSTILE: &[&str] = &[
    "\"",
    "'",
    ";",
    "\n",
    "\r",
    "\t",
    "#",
    "{",
    "}",
    "\\",
    "$",
    "`",
    " ",
    "\0",
    "/",
    ".",
    ":",
    "-j ACCEPT",
    "--jump",
    "-A INPUT",
    "COMMIT",
    "flush ruleset",
    "; flush ruleset",
    "\" ; add rule ip filter INPUT drop ; \"",
    "é",
    "Ω",
    "\u{2028}",
    "\u{85}",
    "\u{202e}",
    "🦀",
    "kube-wasm-proxy",
    "KWP-",
    "round-robin",
    "maglev",
    "weighted",
    "random",
    "least-connections",
    "../../etc/passwd",
    "{\"weights\":{}}",
];

/// A name: usually one the API server takes (a DNS label, sometimes the
/// longest), sometimes a 253-character subdomain, sometimes hostile.
fn name(u: &mut Unstructured) -> Result<String> {
    const LABEL: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";
    let label = |u: &mut Unstructured, len: usize| -> Result<String> {
        let mut s: String = (0..len)
            .map(|_| u.choose(LABEL).map(|b| *b as char))
            .collect::<Result<_>>()?;
        if s.starts_with('-') || s.starts_with(char::is_numeric) {
            s.replace_range(..1, "a");
        }
        if s.ends_with('-') {
            s.replace_range(s.len() - 1.., "z");
        }
        Ok(s)
    };
    Ok(match u.int_in_range(0..=7)? {
        0..=2 => {
            let len = u.int_in_range(1..=8)?;
            label(u, len)?
        }
        3 => label(u, 63)?,
        4 => {
            // 253 characters: four labels of 63 and a dot each, less one.
            let parts: Vec<String> = (0..4).map(|_| label(u, 63)).collect::<Result<_>>()?;
            parts.join(".")[..253]
                .trim_end_matches(['.', '-'])
                .to_string()
        }
        _ => hostile(u)?,
    })
}

fn hostile(u: &mut Unstructured) -> Result<String> {
    let mut s = String::new();
    for _ in 0..u.int_in_range(1..=4)? {
        match u.int_in_range(0..=2)? {
            0 => s.push_str(u.arbitrary::<&str>()?),
            1 => s.push_str(&"x".repeat(u.int_in_range(60..=260)?)),
            _ => s.push_str(u.choose(HOSTILE)?),
        }
    }
    Ok(s)
}

fn ip(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=5)? {
        0 => format!("fd00::{:x}", u.int_in_range(1..=9u8)?),
        1 => hostile(u)?,
        _ => format!(
            "10.0.{}.{}",
            u.int_in_range(0..=1u8)?,
            u.int_in_range(1..=9u8)?
        ),
    })
}

fn maybe<T>(
    u: &mut Unstructured,
    f: impl FnOnce(&mut Unstructured) -> Result<T>,
) -> Result<Option<T>> {
    Ok(if u.arbitrary()? { Some(f(u)?) } else { None })
}

fn protocol(u: &mut Unstructured) -> Result<&'static str> {
    u.choose(&["TCP", "UDP", "SCTP"]).copied()
}

/// A Service and an EndpointSlice for it.
fn service(u: &mut Unstructured) -> Result<(Value, Value)> {
    let (namespace, svc) = (name(u)?, name(u)?);
    let ports: Vec<(String, &str, u16)> = (0..u.int_in_range(1..=2)?)
        .map(|_| Ok((name(u)?, protocol(u)?, u.int_in_range(1..=3)?)))
        .collect::<Result<_>>()?;
    let mut annotations = serde_json::Map::new();
    if let Some(p) = maybe(u, |u| name(u))? {
        annotations.insert("kube-wasm-proxy.io/lb-policy".into(), p.into());
    }
    if let Some(c) = maybe(u, hostile)? {
        annotations.insert("kube-wasm-proxy.io/lb-policy-config".into(), c.into());
    }
    if let Some(c) = maybe(u, hostile)? {
        annotations.insert(name(u)?, c.into());
    }
    let kind = *u.choose(&["ClusterIP", "NodePort", "LoadBalancer"])?;
    let service = json!({
        "metadata": {"name": svc, "namespace": namespace, "annotations": annotations},
        "spec": {
            "type": kind,
            "clusterIP": ip(u)?,
            "ports": ports.iter().map(|(n, p, port)| json!({
                "name": n, "protocol": p, "port": 80 + port,
                "nodePort": if kind == "ClusterIP" { Value::Null } else { (30000 + port).into() },
            })).collect::<Vec<_>>(),
            "externalIPs": maybe(u, |u| Ok(vec![ip(u)?]))?,
            "loadBalancerSourceRanges": maybe(u, |u| Ok(vec![hostile(u)?, "10.1.0.0/16".into()]))?,
            "sessionAffinity": *u.choose(&["None", "ClientIP"])?,
            "externalTrafficPolicy": *u.choose(&["Cluster", "Local"])?,
            "internalTrafficPolicy": *u.choose(&["Cluster", "Local"])?,
        },
        "status": {"loadBalancer": {"ingress": maybe(u, |u| Ok(vec![json!({"ip": ip(u)?})]))?}},
    });
    let endpoints: Vec<Value> = (0..u.int_in_range(0..=3)?)
        .map(|_| {
            Ok(json!({
                "addresses": [ip(u)?],
                "conditions": {"ready": u.arbitrary::<bool>()?, "terminating": u.arbitrary::<bool>()?},
                "nodeName": if u.arbitrary()? { NODE.to_string() } else { name(u)? },
                "zone": maybe(u, name)?,
                "hints": {"forZones": [{"name": name(u)?}], "forNodes": [{"name": name(u)?}]},
            }))
        })
        .collect::<Result<_>>()?;
    let slice = json!({
        "metadata": {
            "name": name(u)?,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": if u.arbitrary()? { svc } else { name(u)? }},
        },
        "addressType": *u.choose(&["IPv4", "IPv6"])?,
        "endpoints": endpoints,
        "ports": ports.iter().map(|(n, p, port)| json!({"name": n, "protocol": p, "port": 8000 + port}))
            .collect::<Vec<_>>(),
    });
    Ok((service, slice))
}

fn node(u: &mut Unstructured) -> Result<Value> {
    Ok(json!({
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": name(u)?}},
        "spec": {"podCIDRs": [hostile(u)?]},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.9.9"}]},
    }))
}

/// One proxier per mode, writing to a recorder, with its reading of the text.
struct Renderer {
    proxier: Proxier,
    state: ClusterState,
    written: Arc<Mutex<Vec<String>>>,
    confined: fn(&str) -> std::result::Result<(), String>,
}

fn renderers() -> Vec<Renderer> {
    let runtime = Runtime::new(crate::plugin::Limits::default()).expect("plugin runtime");
    let rules = Rules::default();
    let modes: [(&str, fn(&str) -> std::result::Result<(), String>); 2] = [
        ("nftables", |s| {
            confinement::nft_script(s, &Rules::default().nft_table)
        }),
        ("iptables", |s| {
            confinement::iptables_restore(s, &Rules::default().iptables_prefix)
        }),
    ];
    modes
        .into_iter()
        .map(|(mode, confined)| {
            let (_, bytes) = Catalog::new(None).load(mode).expect("bundled mode");
            let component = runtime.compile(&bytes).expect("bundled mode compiles");
            let settings = ModeSettings {
                table: rules.nft_table.clone(),
                ..ModeSettings::default()
            };
            let m = Mode::new(runtime.clone(), mode, &component, settings.clone()).expect("mode");
            let written = Arc::new(Mutex::new(Vec::new()));
            let recorder = Box::new(Recorder(written.clone()));
            let dataplane: Box<dyn crate::dataplane::Dataplane> = if mode == "nftables" {
                Box::new(NftDataplane::with_kernel(&rules.nft_table, recorder))
            } else {
                Box::new(IptablesDataplane::with_kernel(recorder))
            };
            let catalog = Catalog::new(None);
            let proxier = Proxier::new(
                runtime.clone(),
                catalog,
                m,
                settings,
                "round-robin",
                None,
                dataplane,
            )
            .expect("proxier");
            Renderer {
                proxier,
                state: ClusterState::new(NODE),
                written,
                confined,
            }
        })
        .collect()
}

thread_local! {
    static RENDERERS: RefCell<Option<Vec<Renderer>>> = const { RefCell::new(None) };
}

pub fn rendered_rules(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let Ok(count) = u.int_in_range(1..=3) else {
        return;
    };
    for _ in 0..count {
        let Ok((svc, slice)) = service(&mut u) else {
            return;
        };
        let (Ok(svc), Ok(slice)) = (serde_json::from_value(svc), serde_json::from_value(slice))
        else {
            return;
        };
        services.push(svc);
        slices.push(slice);
    }
    let node = node(&mut u)
        .ok()
        .and_then(|n| serde_json::from_value(n).ok());
    RENDERERS.with_borrow_mut(|r| {
        for renderer in r.get_or_insert_with(renderers) {
            renderer
                .state
                .replace_all(&services, &slices, node.as_ref());
            let changes = renderer.state.take_changes();
            let _ = renderer.proxier.sync(changes, &renderer.state);
            for script in renderer.written.lock().expect("recorder").drain(..) {
                (renderer.confined)(&script)
                    .unwrap_or_else(|e| panic!("{e}\nin the text written:\n{script}"));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The target reaches what it is about: a plain Service through both
    /// bundled modes writes text, and that text passes the reading.
    #[test]
    fn a_plain_service_is_written_by_both_modes_and_passes_the_reading() {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "t"},
            "spec": {"clusterIP": "10.0.0.1", "ports": [{"name": "p", "port": 80}]},
        }))
        .unwrap();
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "t",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.1.1"], "conditions": {"ready": true}}],
            "ports": [{"name": "p", "port": 8080}],
        }))
        .unwrap();
        for mut r in renderers() {
            r.state.replace_all(&[svc.clone()], &[slice.clone()], None);
            let changes = r.state.take_changes();
            r.proxier.sync(changes, &r.state).unwrap();
            let written: Vec<String> = r.written.lock().unwrap().drain(..).collect();
            assert!(
                written.iter().any(|s| s.contains("10.0.1.1")),
                "no endpoint written: {written:?}"
            );
            for script in written {
                (r.confined)(&script).unwrap_or_else(|e| panic!("{e}\n{script}"));
            }
        }
    }
}
