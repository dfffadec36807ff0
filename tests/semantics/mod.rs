//! What a Service means, with real packets, written once and run for every
//! kernel mode: `semantics::<scenario>::<mode>` (filter `semantics::` for all,
//! `::iptables_legacy` for one mode). Each scenario builds its own namespace
//! cluster (common/topology.rs), starts the proxy in the mode and asserts
//! who answered and which source address the pod saw.
//!
//! A new mode is a `Mode` below and one line in `for_each_mode!`. What only
//! one mode has (nft maps, Maglev in the kernel, iptables chain layout and
//! backend choice, dry-run formats) stays in that mode's own module.

mod config;
mod lifecycle;
mod traffic;

use std::collections::BTreeSet;

use crate::common::node_proxy::{CONFIG, Proxy, start_full};
use crate::common::topology::Cluster;

/// One kernel mode as the scenarios drive it.
pub struct Mode {
    /// Short and unique: part of the scenario's namespace names.
    pub tag: &'static str,
    /// `--proxy-mode`.
    pub flag: &'static str,
    /// The KubeProxyConfiguration section of the mode's own settings.
    pub config_section: &'static str,
    /// Makes the node what the mode needs, before every proxy start.
    pub prepare: fn(&Cluster),
    /// Everything the mode programmed, both families, as text.
    pub rules: fn(&Cluster) -> String,
    /// Removes what a killed proxy left, so that the next starts afresh.
    pub clean: fn(&Cluster),
    /// Adds another program's rules to the kernel interface the mode uses.
    pub add_foreign: fn(&Cluster),
    /// Those rules, listed.
    pub foreign: fn(&Cluster) -> String,
    /// Text the mode's rules must hold in some scenarios.
    pub marks: Marks,
}

/// Rule text a mode must show beyond what packets prove (empty: nothing).
pub struct Marks {
    /// Four endpoints chosen evenly.
    pub spread_over_four: &'static [&'static str],
    /// ClientIP affinity of 60 s.
    pub affinity_60s: &'static [&'static str],
    /// Endpoint weights 3 : 1 (waited for before the traffic).
    pub three_to_one: &'static str,
    /// `masqueradeAll: true`.
    pub masquerade_all: &'static [&'static str],
}

// One line per mode in each list it belongs to: a `#[test]` of the
// scenario in that mode.
macro_rules! for_each_mode {
    // Every mode and kernel backend.
    (every, $scenario:path) => {
        mode_test!(nftables, NFTABLES, $scenario);
        mode_test!(iptables, IPTABLES, $scenario);
        mode_test!(iptables_legacy, IPTABLES_LEGACY, $scenario);
    };
}

macro_rules! mode_test {
    ($name:ident, $mode:ident, $scenario:path) => {
        #[test]
        fn $name() {
            $scenario(&$crate::semantics::$mode)
        }
    };
}

// `<scenario>::<mode>` for each scenario and each mode of its list.
macro_rules! scenarios {
    ($modes:ident: $($file:ident::$scenario:ident),* $(,)?) => {$(
        mod $scenario {
            for_each_mode!($modes, super::$file::$scenario);
        }
    )*};
}

// The kernel's part: translation, NAT, matches, adoption and deltas.
scenarios! {
    every:
    traffic::cluster_ip_spreads_over_local_and_remote_pods_without_masquerade,
    traffic::node_port_from_outside_is_masqueraded,
    traffic::external_traffic_policy_local_keeps_the_client_ip_and_local_pods,
    traffic::no_endpoints_rejects_and_no_local_endpoints_drops,
    traffic::both_local_short_circuit_pods_and_the_node_to_every_endpoint,
    traffic::client_ip_affinity_sticks_to_one_pod,
    traffic::udp_cluster_ip_works,
    traffic::dual_stack_services_answer_on_both_families,
    lifecycle::endpoint_changes_apply_incrementally_and_foreign_rules_are_untouched,
    lifecycle::a_restart_adopts_the_rules_without_dropping_a_connection,
    config::external_and_load_balancer_ips_with_source_ranges,
    config::masquerade_all_masquerades_in_cluster_sources_too,
    config::detect_local_modes_decide_who_is_masqueraded,
    config::weighted_policy_weights_reach_the_kernel,
}

// Decided mostly by the host before rendering (which endpoints, its HTTP
// servers, conntrack flushes), run on both iptables backends all the same:
// on the legacy one the same rule text meets another kernel path.
scenarios! {
    every:
    traffic::client_ip_affinity_expires_after_its_timeout,
    traffic::internal_traffic_policy_local_and_traffic_from_the_node,
    traffic::internal_local_leaves_node_ports_to_every_endpoint,
    traffic::external_local_falls_back_to_a_local_terminating_pod,
    traffic::internal_local_without_local_pods_drops_and_node_ports_serve,
    lifecycle::stale_udp_conntrack_entries_are_flushed_when_an_endpoint_goes,
    lifecycle::topology_hints_keep_traffic_in_the_zone_when_every_endpoint_has_them,
    lifecycle::terminating_endpoints_serve_only_when_nothing_is_ready,
    config::node_port_addresses_limit_where_node_ports_answer,
    config::health_check_node_ports_report_local_endpoints,
}

impl Mode {
    /// A namespace cluster named for this mode and `tag`.
    pub fn cluster(&self, tag: &str) -> Cluster {
        Cluster::new(&format!("{}-{tag}", self.tag))
    }

    /// The proxy in this mode on `objects`, with `CONFIG` and the Node.
    pub fn start(&self, c: &Cluster, objects: &str) -> Proxy {
        self.start_with(c, objects, CONFIG, &Cluster::node_yaml())
    }

    pub fn start_with(&self, c: &Cluster, objects: &str, config: &str, node: &str) -> Proxy {
        (self.prepare)(c);
        start_full(c, objects, config, node, &["--proxy-mode", self.flag])
    }

    pub fn rules(&self, c: &Cluster) -> String {
        (self.rules)(c)
    }

    /// Asserts that the rules hold every one of `marks`.
    pub fn assert_marks(&self, c: &Cluster, marks: &[&str]) {
        let rules = self.rules(c);
        for mark in marks {
            assert!(
                rules.contains(mark),
                "{}: no {mark:?} in\n{rules}",
                self.flag
            );
        }
    }
}

pub fn pods(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

pub const NFTABLES: Mode = Mode {
    tag: "nft",
    flag: "nftables",
    config_section: "nftables",
    prepare: |_| {},
    rules: |c| c.node.sh("nft list ruleset"),
    clean: |c| {
        c.node
            .sh("nft delete table ip kube-wasm-proxy && nft delete table ip6 kube-wasm-proxy");
    },
    add_foreign: |c| {
        c.node.sh("nft add table inet bystander && nft add chain inet bystander input '{ type filter hook input priority 0; }' && nft add rule inet bystander input tcp dport 9 accept");
    },
    foreign: |c| c.node.sh("nft list table inet bystander"),
    marks: Marks {
        spread_over_four: &[],
        affinity_60s: &[],
        three_to_one: "goto class-4",
        masquerade_all: &[],
    },
};

const IPTABLES_MARKS: Marks = Marks {
    spread_over_four: &["--mode random --probability 0.2500000000"],
    affinity_60s: &["--rcheck --seconds 60 --reap"],
    three_to_one: "--probability 0.75000000",
    masquerade_all: &[
        "-A KWP-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "--random-fully",
    ],
};

/// iptables on the nft backend (what a node with no legacy rules gets).
pub const IPTABLES: Mode = Mode {
    tag: "ipt",
    flag: "iptables",
    config_section: "iptables",
    prepare: |_| {},
    rules: |c| iptables_rules(c, "nft"),
    clean: |c| iptables_clean(c, "nft"),
    add_foreign: |c| iptables_add_foreign(c, "nft"),
    foreign: |c| iptables_foreign(c, "nft"),
    marks: IPTABLES_MARKS,
};

/// iptables on the legacy backend: a rule of another program in the legacy
/// tables makes the proxy choose it (as upstream's wrapper decides; see
/// `iptables::a_node_on_iptables_legacy_gets_its_rules_in_legacy`).
pub const IPTABLES_LEGACY: Mode = Mode {
    tag: "leg",
    flag: "iptables",
    config_section: "iptables",
    prepare: |c| {
        c.node.sh("iptables-legacy -S E2E-LEGACY >/dev/null 2>&1 || { iptables-legacy -N E2E-LEGACY && iptables-legacy -A INPUT -j E2E-LEGACY; }");
    },
    rules: |c| {
        let rules = iptables_rules(c, "legacy");
        // The backend is the point of this mode: nothing may be in nft.
        assert!(
            !iptables_rules(c, "nft").contains("KWP-"),
            "rules in the nft backend"
        );
        rules
    },
    clean: |c| iptables_clean(c, "legacy"),
    add_foreign: |c| iptables_add_foreign(c, "legacy"),
    foreign: |c| iptables_foreign(c, "legacy"),
    marks: IPTABLES_MARKS,
};

fn iptables_rules(c: &Cluster, backend: &str) -> String {
    c.node.sh(&format!(
        "iptables-{backend}-save; ip6tables-{backend}-save"
    ))
}

fn iptables_clean(c: &Cluster, backend: &str) {
    let ipt = format!("iptables-{backend}");
    c.node.sh(&format!(
        "{ipt} -t nat -F && {ipt} -t nat -X && {ipt} -F && {ipt} -X"
    ));
}

fn iptables_add_foreign(c: &Cluster, backend: &str) {
    let ipt = format!("iptables-{backend}");
    c.node.sh(&format!(
        "{ipt} -N BYSTANDER && {ipt} -A BYSTANDER -p tcp --dport 9 -j ACCEPT && {ipt} -A INPUT -j BYSTANDER && {ipt} -t nat -N BYSTANDER-NAT && {ipt} -t nat -A PREROUTING -j BYSTANDER-NAT"
    ));
}

fn iptables_foreign(c: &Cluster, backend: &str) -> String {
    c.node
        .sh(&format!(
            "iptables-{backend}-save -t filter; iptables-{backend}-save -t nat"
        ))
        .lines()
        .filter(|l| l.contains("BYSTANDER"))
        .map(|l| format!("{l}\n"))
        .collect()
}
