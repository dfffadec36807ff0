//! The nftables dataplane's periodic resync in a real kernel (a private
//! network namespace, nft 1.0.x): Services over several slot counts
//! (`typeof` backend maps), a resync with no drift sends no transaction,
//! one endpoint change is one small transaction, and drift made with `nft`
//! behind its back is repaired, `typeof` maps included. Needs root.

use crate::common::resync::{name, program, run};

use kwp::dataplane::Dataplane;
use kwp::dataplane::nftables::NftDataplane;
use kwp::plan::{Fragment, Item, NftFamily};

const T: &str = "kwp-resync";
const SERVICES: usize = 500;

fn item_set(name: &str, declaration: String) -> Item {
    Item::NftSet {
        family: NftFamily::Ip,
        table: T.into(),
        name: name.into(),
        declaration,
    }
}

fn item_chain(name: &str, rule: String) -> Item {
    Item::NftChain {
        family: NftFamily::Ip,
        table: T.into(),
        name: name.into(),
        hook: None,
        rules: vec![rule],
    }
}

fn item_element(set: &str, element: String) -> Item {
    Item::NftElement {
        family: NftFamily::Ip,
        table: T.into(),
        set: set.into(),
        element,
    }
}

/// Service `n` the way the nftables plugin renders a fast-path Service:
/// `goto class-W`, its W slots in `backends-W`; `shift` moves slot 0.
fn fast_path(n: usize, w: usize, shift: usize) -> Fragment {
    let frontend = format!("10.96.{}.{} . tcp . 80", n / 250, n % 250);
    let mut items = vec![
        item_set(
            &format!("backends-{w}"),
            format!(
                "typeof ip daddr . meta l4proto . th dport . numgen random mod {w} : ip daddr . th dport"
            ),
        ),
        item_chain(
            &format!("class-{w}"),
            format!(
                "meta l4proto {{ tcp, udp, sctp }} dnat ip to ip daddr . meta l4proto . th dport . numgen random mod {w} map @backends-{w}"
            ),
        ),
        item_element("service-ips", format!("{frontend} : goto class-{w}")),
    ];
    for j in 0..w {
        let host = if j == 0 { 100 + shift } else { j };
        items.push(item_element(
            &format!("backends-{w}"),
            format!("{frontend} . {j} : 172.16.{}.{host} . 8080", n % 250),
        ));
    }
    Fragment {
        items: items.into(),
    }
}

fn base() -> Fragment {
    let base_chain = Item::NftChain {
        family: NftFamily::Ip,
        table: T.into(),
        name: "nat-prerouting".into(),
        hook: Some("type nat hook prerouting priority dstnat".into()),
        rules: vec!["ip daddr . meta l4proto . th dport vmap @service-ips".into()],
    };
    Fragment {
        items: vec![
            item_set(
                "service-ips",
                "type ipv4_addr . inet_proto . inet_service : verdict".into(),
            ),
            base_chain,
        ]
        .into(),
    }
}

fn nft(args: &str) -> String {
    run("nft", args)
}

#[test]
fn resync_compares_with_the_kernel_and_repairs_only_drift() {
    // nft, started from the namespace's thread, works in it.
    crate::common::netns::in_private_netns(in_namespace);
}

fn in_namespace() {
    let mut dp = NftDataplane::new(T);
    let fragments: Vec<Fragment> = (0..SERVICES).map(|n| fast_path(n, 3 + n % 5, 0)).collect();
    program(&mut dp, &base(), &fragments, "");
    let programmed = dp.transactions;

    // No drift: the resync reads the kernel and writes nothing.
    let started = std::time::Instant::now();
    dp.resync().expect("resync");
    eprintln!("resync over {SERVICES} Services: {:?}", started.elapsed());
    dp.resync().expect("resync");
    assert_eq!(
        dp.transactions, programmed,
        "a clean resync sent a transaction"
    );

    // One endpoint moves: one delta, in the kernel at once.
    let moved = fast_path(7, 3 + 7 % 5, 1);
    dp.apply(None, &[(name(7, ""), Some(&moved))])
        .expect("delta");
    assert_eq!(dp.transactions, programmed + 1);
    let backends = nft(&format!("list map ip {T} backends-5"));
    assert!(backends.contains("10.96.0.7 . tcp . 80 . 0 : 172.16.7.101 . 8080"));
    dp.resync().expect("resync");
    assert_eq!(
        dp.transactions,
        programmed + 1,
        "resync after a change wrote"
    );

    // Drift: an element deleted and a chain flushed behind our back. The
    // repair re-creates the `typeof` map and refills the chain using it,
    // which nft 1.0.x accepts only in that order.
    nft(&format!(
        "delete element ip {T} backends-5 {{ 10.96.0.2 . tcp . 80 . 1 }}"
    ));
    nft(&format!("flush chain ip {T} class-3"));
    dp.resync().expect("repair");
    assert_eq!(dp.transactions, programmed + 2, "one repair transaction");
    assert_eq!(dp.repairs, 1);
    let backends = nft(&format!("list map ip {T} backends-5"));
    assert!(backends.contains("10.96.0.2 . tcp . 80 . 1 : 172.16.2.1 . 8080"));
    let class = nft(&format!("list chain ip {T} class-3"));
    assert!(class.contains("map @backends-3"), "{class}");
    // An element's value changed (same count) is drift too.
    nft(&format!(
        "delete element ip {T} backends-4 {{ 10.96.0.1 . tcp . 80 . 3 }}"
    ));
    nft(&format!(
        "add element ip {T} backends-4 {{ 10.96.0.1 . tcp . 80 . 3 : 192.0.2.1 . 9 }}"
    ));
    dp.resync().expect("repair");
    assert_eq!(dp.repairs, 2);
    let backends = nft(&format!("list map ip {T} backends-4"));
    assert!(backends.contains("10.96.0.1 . tcp . 80 . 3 : 172.16.1.3 . 8080"));
    assert!(!backends.contains("192.0.2.1"));
    // Clean again.
    dp.resync().expect("resync");
    assert_eq!(dp.transactions, programmed + 3);
}
