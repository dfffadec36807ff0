//! The periodic resync against the in-memory kernel: with Services spread
//! over several slot counts (fast-path `typeof` maps), a resync with no
//! drift writes nothing, one endpoint change writes a handful of
//! commands, and drift behind our back is repaired object by object.

use super::fake::FakeNft;
use super::*;
use crate::model::Protocol;
use crate::plan::{Item, NftFamily};

const T: &str = "kwp";

fn name(n: usize) -> ServicePortName {
    ServicePortName {
        namespace: "t".into(),
        name: format!("s{n}").into(),
        port: "".into(),
        protocol: Protocol::Tcp,
    }
}

fn set(name: &str, declaration: &str) -> Item {
    Item::NftSet {
        family: NftFamily::Ip,
        table: T.into(),
        name: name.into(),
        declaration: declaration.into(),
    }
}

fn chain(name: &str, rules: &[String]) -> Item {
    Item::NftChain {
        family: NftFamily::Ip,
        table: T.into(),
        name: name.into(),
        hook: None,
        rules: rules.to_vec(),
    }
}

fn element(set: &str, element: String) -> Item {
    Item::NftElement {
        family: NftFamily::Ip,
        table: T.into(),
        set: set.into(),
        element,
    }
}

/// The dispatch map and chain, as the nftables plugin's base has them.
fn base() -> Fragment {
    Fragment {
        items: vec![
            set(
                "service-ips",
                "type ipv4_addr . inet_proto . inet_service : verdict",
            ),
            chain(
                "services",
                &["ip daddr . meta l4proto . th dport vmap @service-ips".into()],
            ),
        ]
        .into(),
    }
}

/// A fast-path Service as the plugin renders it: `goto class-W`, and its
/// W backends in the `typeof` map `backends-W`. `moved` shifts its first
/// endpoint.
fn service(n: usize, w: usize, moved: u8) -> Fragment {
    let frontend = format!("10.96.{}.{} . tcp . 80", n / 250, n % 250);
    let mut items = vec![
        set(
            &format!("backends-{w}"),
            &format!(
                "typeof ip daddr . meta l4proto . th dport . numgen random mod {w} : ip daddr . th dport"
            ),
        ),
        chain(
            &format!("class-{w}"),
            &[format!(
                "meta l4proto {{ tcp, udp, sctp }} dnat ip to ip daddr . meta l4proto . th dport . numgen random mod {w} map @backends-{w}"
            )],
        ),
        element("service-ips", format!("{frontend} : goto class-{w}")),
    ];
    for j in 0..w {
        let last = if j == 0 { 100 + moved } else { j as u8 };
        items.push(element(
            &format!("backends-{w}"),
            format!("{frontend} . {j} : 172.16.{}.{last} . 8080", n % 250),
        ));
    }
    Fragment {
        items: items.into(),
    }
}

/// 60 Services over slot counts 3 to 7, programmed.
fn programmed() -> (NftDataplane, FakeNft, Vec<Fragment>) {
    let fake = FakeNft::default();
    let mut dp = NftDataplane::with_kernel(T, Box::new(fake.clone()));
    let fragments: Vec<Fragment> = (0..60).map(|n| service(n, 3 + n % 5, 0)).collect();
    let changed: Vec<(ServicePortName, Option<&Fragment>)> = (fragments.iter().enumerate())
        .map(|(n, f)| (name(n), Some(f)))
        .collect();
    let applied = dp.apply(Some(&base()), &changed).unwrap();
    assert!(applied.refused.is_empty());
    (dp, fake, fragments)
}

#[test]
fn a_resync_without_drift_writes_nothing_and_one_change_writes_a_handful() {
    let (mut dp, fake, _) = programmed();
    let full = fake.commands();
    // Elements go in lines of up to 1000: 37 lines here.
    assert!(full > 30, "the first sync wrote everything: {full}");
    let before = fake.dump();

    // The periodic resync: nothing drifted, nothing is written.
    dp.resync().unwrap();
    dp.resync().unwrap();
    assert_eq!(
        fake.commands(),
        full,
        "a resync without drift rewrote the table"
    );
    assert_eq!(fake.dump(), before);

    // One endpoint of one Service moves: one element out, one in.
    let moved = service(7, 3 + 7 % 5, 1);
    dp.apply(None, &[(name(7), Some(&moved))]).unwrap();
    let written = fake.commands() - full;
    assert!(written <= 2, "one endpoint change wrote {written} commands");
    let backends = fake.elements("ip", T, "backends-5").unwrap();
    assert!(backends.contains(&"10.96.0.7 . tcp . 80 . 0 : 172.16.7.101 . 8080".to_string()));

    // A change moving a Service to another slot count: still its own
    // elements only, no map re-created.
    let grown = service(8, 7, 0);
    let at = fake.commands();
    dp.apply(None, &[(name(8), Some(&grown))]).unwrap();
    let written = fake.commands() - at;
    // 6 + 1 deletes (one line each), 2 grouped adds.
    assert!(
        written <= 9,
        "a new slot count for one Service wrote {written}"
    );

    // And the resyncs after changes still write nothing.
    let at = fake.commands();
    dp.resync().unwrap();
    dp.resync().unwrap();
    assert_eq!(fake.commands(), at, "a resync after changes rewrote");
}

#[test]
fn drift_behind_our_back_is_repaired_object_by_object() {
    let (mut dp, fake, _) = programmed();
    dp.resync().unwrap(); // records the summaries
    let intact = fake.dump();

    // Someone deletes one backend element: only that map (re-created, as
    // nft 1.0.x needs for `typeof` maps) and the chain using it are written.
    fake.preload(&format!(
        "delete element ip {T} backends-5 {{ 10.96.0.2 . tcp . 80 . 1 }}"
    ));
    dp.resync().unwrap();
    assert_eq!(fake.dump(), intact, "the element is back");
    let repair = fake.last_script();
    for untouched in [
        "backends-3",
        "backends-4",
        "backends-6",
        "backends-7",
        "service-ips",
    ] {
        assert!(
            !repair.contains(untouched),
            "repairing backends-5 wrote {untouched}:\n{repair}"
        );
    }
    assert!(repair.contains("delete map ip kwp backends-5"), "{repair}");
    assert!(repair.contains("flush chain ip kwp class-5"), "{repair}");
    assert_eq!(dp.repairs, 1);

    // Someone changes an element's value (same count): the digest differs.
    fake.preload(&format!(
        "delete element ip {T} backends-3 {{ 10.96.0.0 . tcp . 80 . 2 }}\n\
         add element ip {T} backends-3 {{ 10.96.0.0 . tcp . 80 . 2 : 192.0.2.1 . 9 }}"
    ));
    dp.resync().unwrap();
    assert_eq!(fake.dump(), intact, "the value is repaired");

    // Someone flushes the dispatch chain and adds a chain of their own.
    fake.preload(&format!(
        "flush chain ip {T} services\nadd chain ip {T} intruder"
    ));
    let at = fake.commands();
    dp.resync().unwrap();
    assert_eq!(
        fake.dump(),
        intact,
        "the chain is refilled, the intruder gone"
    );
    assert!(fake.commands() - at < 10, "no map was rewritten");
    let repair = fake.last_script();
    assert!(!repair.contains("backends-"), "{repair}");
    assert_eq!(dp.repairs, 3);

    // Clean again: nothing written.
    let at = fake.commands();
    dp.resync().unwrap();
    assert_eq!(fake.commands(), at);
}
