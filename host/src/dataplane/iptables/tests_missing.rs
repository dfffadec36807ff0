//! `iptables-restore` missing (or killed at its deadline) refuses no
//! Service: the batch fails as a whole, at once, so the sync fails and
//! `/healthz` follows, as in nftables mode (issue 14, part 3).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::fake::FakeIptables;
use super::tests::name;
use super::*;
use crate::dataplane::tool::Unavailable;

/// The fake, with `restore` and `check` failing as a missing tool does
/// while `missing` is set; `tries` counts their calls.
#[derive(Clone, Default)]
struct Removable {
    fake: FakeIptables,
    missing: Arc<AtomicBool>,
    tries: Arc<AtomicUsize>,
}

impl Removable {
    fn tool(&self) -> Result<()> {
        self.tries.fetch_add(1, Ordering::Relaxed);
        if self.missing.load(Ordering::Relaxed) {
            return Err(Unavailable::new(
                "running iptables-restore (is it installed?): No such file or directory",
            )
            .into());
        }
        Ok(())
    }
}

impl IptablesKernel for Removable {
    fn restore(&mut self, ipv6: bool, table: &str, text: &str) -> Result<()> {
        self.tool()?;
        self.fake.restore(ipv6, table, text)
    }
    fn check(&mut self, ipv6: bool, table: &str, text: &str) -> Result<()> {
        self.tool()?;
        self.fake.check(ipv6, table, text)
    }
    fn save(&mut self, ipv6: bool, table: &str) -> Result<String> {
        self.fake.save(ipv6, table)
    }
    fn chain_rules(&mut self, ipv6: bool, table: &str, chain: &str) -> Result<Option<Vec<String>>> {
        self.fake.chain_rules(ipv6, table, chain)
    }
    fn enable_route_localnet(&mut self) -> Result<()> {
        self.fake.enable_route_localnet()
    }
}

fn chain(name: &str, rules: &[String]) -> Item {
    Item::IptablesChain {
        ipv6: false,
        table: "nat".into(),
        name: name.into(),
        rules: rules.to_vec(),
    }
}

fn fragment(items: Vec<Item>) -> Fragment {
    Fragment {
        items: items.into(),
    }
}

fn base() -> Fragment {
    fragment(vec![
        chain("KWP-SERVICES", &["-j KWP-SERVICE-IPS".into()]),
        chain("KWP-SERVICE-IPS", &[]),
    ])
}

/// A Service with its own chain (a new chain: a full reconcile).
fn service(n: &str, ip: u8) -> Fragment {
    let svc = format!("KWP-SVC-{n}");
    fragment(vec![
        chain(
            "KWP-SERVICE-IPS",
            &[format!(
                "-d 10.96.0.{ip}/32 -p tcp -m tcp --dport 80 -j {svc}"
            )],
        ),
        chain(
            &svc,
            &[format!(
                "-p tcp -m tcp -j DNAT --to-destination 10.244.1.{ip}:80"
            )],
        ),
    ])
}

#[test]
fn a_missing_iptables_restore_fails_the_batch_not_each_service() {
    let kernel = Removable::default();
    let mut dp = IptablesDataplane::with_kernel(Box::new(kernel.clone()));
    dp.apply(Some(&base()), &[]).unwrap();
    let before = kernel.fake.rules(false, "nat", "KWP-SERVICE-IPS");
    kernel.missing.store(true, Ordering::Relaxed);
    let (a, b) = (service("A", 1), service("B", 2));
    let tried = kernel.tries.load(Ordering::Relaxed);
    let err = dp
        .apply(None, &[(name("a"), Some(&a)), (name("b"), Some(&b))])
        .expect_err("the batch fails as a whole: no Service is refused on its own");
    assert!(crate::dataplane::tool::is_unavailable(&err), "{err:#}");
    assert!(
        format!("{err:#}").contains("iptables-restore (is it installed?)"),
        "{err:#}"
    );
    assert!(
        kernel.tries.load(Ordering::Relaxed) - tried <= 2,
        "tried {} times, not at most once each for the delta and the full reconcile",
        kernel.tries.load(Ordering::Relaxed) - tried
    );
    assert_eq!(
        kernel.fake.rules(false, "nat", "KWP-SERVICE-IPS"),
        before,
        "nothing half-written"
    );
    assert_eq!(kernel.fake.rules(false, "nat", "KWP-SVC-A"), None);
    // Once the tool is back, the same changes land.
    kernel.missing.store(false, Ordering::Relaxed);
    let applied = dp
        .apply(None, &[(name("a"), Some(&a)), (name("b"), Some(&b))])
        .unwrap();
    assert!(applied.refused.is_empty(), "{:?}", applied.refused);
    assert_eq!(
        kernel
            .fake
            .rules(false, "nat", "KWP-SERVICE-IPS")
            .unwrap()
            .len(),
        2
    );
}
