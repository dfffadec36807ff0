//! The element encoder against known byte layouts, and which deltas the
//! dataplane sends as element batches (against the in-memory kernel,
//! which runs the batch's nft text).

use super::elements::{Data, ElementBatch, Field, Layout, Value, encode};
use super::fake::FakeNft;
use super::*;
use crate::model::Protocol;
use crate::plan::{Item, NftFamily};

const SERVICE_IPS: &str = "type ipv4_addr . inet_proto . inet_service : verdict";
const BACKENDS: &str =
    "typeof ip daddr . meta l4proto . th dport . numgen random mod 3 : ip daddr . th dport";

#[test]
fn layouts_of_the_plugins_declarations() {
    use Field::*;
    let layout = Layout::of(SERVICE_IPS).unwrap();
    assert_eq!(layout.key, [Ipv4, Proto, Service]);
    assert_eq!(layout.data, Data::Verdict);
    let layout = Layout::of(BACKENDS).unwrap();
    assert_eq!(layout.key, [Ipv4, Proto, Service, HostU32]);
    assert_eq!(layout.data, Data::Value(vec![Ipv4, Service]));
    let layout =
        Layout::of("typeof meta l4proto . th dport . numgen random mod 2 : ip6 daddr . th dport")
            .unwrap();
    assert_eq!(layout.data, Data::Value(vec![Ipv6, Service]));
    assert_eq!(
        Layout::of("type ipv6_addr . ipv6_addr").unwrap().data,
        Data::None
    );
    // Anything else goes through nft text.
    for other in [
        "type ipv4_addr; flags dynamic,timeout; timeout 10800s;",
        "type ether_addr",
        "typeof ip daddr . ct mark",
        "type ipv4_addr : ipv4_addr : verdict",
    ] {
        assert_eq!(Layout::of(other), None, "{other}");
    }
}

#[test]
fn keys_and_data_in_register_layout() {
    let service_ips = Layout::of(SERVICE_IPS).unwrap();
    let e = encode(&service_ips, "10.96.0.1 . tcp . 80 : goto svc-a", false).unwrap();
    // Each field of a concatenation padded to 4 bytes, network order.
    assert_eq!(e.key, [10, 96, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
    assert_eq!(
        e.data,
        Some(Value::Verdict {
            code: -4, // NFT_GOTO
            chain: Some("svc-a".into())
        })
    );
    let drop = encode(&service_ips, "10.96.0.1 . sctp . 8080 : drop", false).unwrap();
    assert_eq!(drop.key[4..], [132, 0, 0, 0, 0x1f, 0x90, 0, 0]);
    assert_eq!(
        drop.data,
        Some(Value::Verdict {
            code: 0,
            chain: None
        })
    );
    // Deletion is by key alone.
    let key = encode(&service_ips, "10.96.0.1 . udp . 53 : goto svc-a", true).unwrap();
    assert_eq!((key.key[4], key.data), (17, None));

    // numgen's slot is a host-order u32.
    let backends = Layout::of(BACKENDS).unwrap();
    let e = encode(
        &backends,
        "10.96.0.7 . udp . 53 . 2 : 172.16.7.101 . 8080",
        false,
    )
    .unwrap();
    let mut key = vec![10, 96, 0, 7, 17, 0, 0, 0, 0, 53, 0, 0];
    key.extend(2u32.to_ne_bytes());
    assert_eq!(e.key, key);
    assert_eq!(
        e.data,
        Some(Value::Bytes(vec![172, 16, 7, 101, 0x1f, 0x90, 0, 0]))
    );

    let hairpin = Layout::of("type ipv6_addr . ipv6_addr").unwrap();
    let e = encode(&hairpin, "fd00::1 . fd00::1", false).unwrap();
    let one: [u8; 16] = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
    assert_eq!(e.key, [one, one].concat());

    // A key of one field is not padded: nft 1.0.6 sends a lone port as a
    // 2-byte attribute (`--debug=mnl`: len 6 = header + 7d 01), and the
    // kernel refuses 4 bytes with EINVAL (IPVS mode's health-check ports).
    let ports = Layout::of("type inet_service").unwrap();
    assert_eq!(encode(&ports, "32001", false).unwrap().key, [0x7d, 0x01]);
    let protos = Layout::of("type inet_proto").unwrap();
    assert_eq!(encode(&protos, "tcp", false).unwrap().key, [6]);

    // Not understood: no encoding (the delta goes through nft).
    for bad in [
        "10.96.0.1 . tcp . http : goto svc-a",
        "10.96.0.1 . tcp : goto svc-a",
        "10.96.0.1 . tcp . 80",
        "10.96.0.1 . tcp . 80 : goto \"odd chain\"",
        "10.96.0.1 . tcp . 80 : queue",
        "fd00::1 . tcp . 80 : drop",
    ] {
        assert_eq!(encode(&service_ips, bad, false), None, "{bad}");
    }
}

/// One attribute, padded, as the kernel reads it (native-order header).
fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
    v.extend(kind.to_ne_bytes());
    v.extend(payload);
    v.resize(v.len().next_multiple_of(4), 0);
    v
}

#[test]
fn a_map_element_message_byte_for_byte() {
    const NESTED: u16 = 0x8000;
    let add = [(
        NftFamily::Ip,
        "m".to_string(),
        "tcp . 30080 : drop".to_string(),
    )];
    let layout = |_: &_| Layout::of("type inet_proto . inet_service : verdict");
    let batch = ElementBatch::encode("t", &[], &add, layout).unwrap();
    assert_eq!(batch.messages.len(), 1);
    let key = nla(NESTED | 1, &nla(1, &[6, 0, 0, 0, 0x75, 0x80, 0, 0]));
    let verdict = nla(NESTED | 2, &nla(1, &0i32.to_be_bytes()));
    let data = nla(NESTED | 2, &verdict);
    let elem = nla(NESTED | 1, &[key, data].concat());
    let want = [nla(1, b"t\0"), nla(2, b"m\0"), nla(NESTED | 3, &elem)].concat();
    assert_eq!(batch.messages[0].attrs, want);
    assert_eq!(batch.messages[0].kind, 12, "NFT_MSG_NEWSETELEM");
    // A set no layout is known for: no batch at all.
    assert!(ElementBatch::encode("t", &[], &add, |_: &_| None).is_none());
}

fn name(n: &str) -> ServicePortName {
    ServicePortName {
        namespace: "t".into(),
        name: n.into(),
        port: "".into(),
        protocol: Protocol::Tcp,
    }
}

fn item(set: Option<&str>, name: &str, text: &str) -> Item {
    match set {
        Some(set) => Item::NftElement {
            family: NftFamily::Ip,
            table: "kwp".into(),
            set: set.into(),
            element: text.into(),
        },
        None => Item::NftSet {
            family: NftFamily::Ip,
            table: "kwp".into(),
            name: name.into(),
            declaration: text.into(),
        },
    }
}

#[test]
fn only_element_deltas_become_batches() {
    let fake = FakeNft::default();
    let mut dp = NftDataplane::with_kernel("kwp", Box::new(fake.clone())).elements_via_nft(false);
    let base = Fragment {
        items: vec![
            item(None, "service-ips", SERVICE_IPS),
            item(
                None,
                "aff",
                "type ipv4_addr; flags dynamic,timeout; timeout 10s;",
            ),
            Item::NftChain {
                family: NftFamily::Ip,
                table: "kwp".into(),
                name: "svc".into(),
                hook: None,
                rules: vec!["drop".into()],
            },
        ]
        .into(),
    };
    let svc = |elements: &[(&str, &str)]| Fragment {
        items: (elements.iter())
            .map(|(set, e)| item(Some(set), "", e))
            .collect::<Vec<_>>()
            .into(),
    };
    let a = svc(&[("service-ips", "10.0.0.1 . tcp . 80 : goto svc")]);
    dp.apply(Some(&base), &[(name("a"), Some(&a))]).unwrap();
    assert_eq!(
        (dp.transactions, dp.element_batches),
        (1, 0),
        "full sync is nft"
    );
    // Elements of a set declared in another fragment: one batch.
    let b = svc(&[("service-ips", "10.0.0.2 . tcp . 80 : goto svc")]);
    dp.apply(None, &[(name("b"), Some(&b))]).unwrap();
    assert_eq!((dp.transactions, dp.element_batches), (2, 1));
    dp.apply(None, &[(name("b"), None)]).unwrap();
    assert_eq!((dp.transactions, dp.element_batches), (3, 2));
    assert_eq!(
        fake.elements("ip", "kwp", "service-ips").unwrap(),
        ["10.0.0.1 . tcp . 80 : goto svc"]
    );
    // An element of a set the encoder does not know: nft text.
    let c = svc(&[("aff", "10.0.0.3")]);
    dp.apply(None, &[(name("c"), Some(&c))]).unwrap();
    assert_eq!((dp.transactions, dp.element_batches), (4, 2));
    // The same through nft when asked to.
    let mut dp =
        NftDataplane::with_kernel("kwp", Box::new(FakeNft::default())).elements_via_nft(true);
    dp.apply(Some(&base), &[]).unwrap();
    dp.apply(None, &[(name("b"), Some(&b))]).unwrap();
    assert_eq!(dp.element_batches, 0);
}

/// nft's own `--debug=netlink` output for an element: each 32-bit word of
/// a register as a host-order hex number; the bytes it stands for.
fn nft_words(words: &str) -> Vec<u8> {
    (words.split_whitespace())
        .flat_map(|w| u32::from_str_radix(w, 16).expect("hex word").to_ne_bytes())
        .collect()
}

/// What `nft 1.0.6 --debug=netlink add element ...` printed for one element
/// of each kind of set and map the plugins declare (plugins/nftables:
/// base.rs, service.rs), IPv4 and IPv6: the encoder must produce those bytes.
#[test]
fn the_same_bytes_nft_sends() {
    let frontend = "type ipv4_addr . inet_proto . inet_service";
    let cases: [(&str, &str, &str, Option<&str>); 8] = [
        (
            "type ipv4_addr . inet_proto . inet_service : verdict",
            "10.0.0.1 . tcp . 80 : goto class-2",
            "0100000a 00000006 00005000",
            None,
        ),
        (
            "typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . th dport",
            "10.0.0.1 . udp . 53 . 1 : 10.1.2.3 . 8080",
            "0100000a 00000011 00003500 00000001",
            Some("0302010a 0000901f"),
        ),
        (
            "type ipv4_addr . ipv4_addr",
            "10.1.2.3 . 10.1.2.3",
            "0302010a 0302010a",
            None,
        ),
        (
            "type inet_proto . inet_service : verdict",
            "sctp . 30000 : drop",
            "00000084 00003075",
            None,
        ),
        (
            "typeof ip6 daddr . meta l4proto . th dport . numgen random mod 2 : ip6 daddr . th dport",
            "fd00::1 . tcp . 443 . 1 : fd00::a:b . 8443",
            "000000fd 00000000 00000000 01000000 00000006 0000bb01 00000001",
            Some("000000fd 00000000 00000000 0b000a00 0000fb20"),
        ),
        (
            "type ipv6_addr",
            "2001:db8::1",
            "b80d0120 00000000 00000000 01000000",
            None,
        ),
        (
            frontend,
            "10.0.0.1 . tcp . 80",
            "0100000a 00000006 00005000",
            None,
        ),
        (
            "typeof meta l4proto . th dport . numgen random mod 2 : ip daddr . th dport",
            "tcp . 30080 . 0 : 10.1.2.3 . 8080",
            "00000006 00008075 00000000",
            Some("0302010a 0000901f"),
        ),
    ];
    for (declaration, element, key, value) in cases {
        let layout = Layout::of(declaration).expect(declaration);
        let encoded = encode(&layout, element, false).expect(element);
        assert_eq!(
            encoded.key,
            nft_words(key),
            "key of {element} in {declaration}"
        );
        if let Some(value) = value {
            assert_eq!(
                encoded.data,
                Some(Value::Bytes(nft_words(value))),
                "{element}"
            );
        }
    }
}
